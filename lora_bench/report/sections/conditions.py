"""The accuracy table of a family's conditions (the generic part of a family section): each variant's test
accuracy with its interval, trainable parameters and difference to the baseline."""

from __future__ import annotations

import pandas as pd

from lora_bench.report import figures
from lora_bench.report.formatting import finite, fmt_count, fmt_interval, fmt_percent, fmt_points, md_text
from lora_bench.report.sections.common import (
    NOT_TESTED,
    PRIMARY_METRIC,
    PRIMARY_SPLIT,
    SectionPart,
    show_accuracy,
    test_cells,
)


def condition_rows(
    family: str, runs: pd.DataFrame, summary: pd.DataFrame, tests: pd.DataFrame,
    item_summary: pd.DataFrame | None = None,
) -> list[dict]:
    """The per-variant table of a (non-epochs) family: accuracy, CI, parameters, difference, verdict."""
    family_runs = runs[runs["family"] == family]
    primary = summary[
        (summary["family"] == family)
        & (summary["metric"] == PRIMARY_METRIC)
        & (summary["split"] == PRIMARY_SPLIT)
        & (summary["stage"] == "final")
    ].set_index("variant")
    params = summary[(summary["family"] == family) & (summary["metric"] == "trainable_params")].set_index(
        "variant"
    )
    family_tests = tests[(tests["family"] == family) & (tests["metric"] == PRIMARY_METRIC)]
    family_tests = family_tests[family_tests["split"] == PRIMARY_SPLIT].set_index("variant")
    rows = []
    for variant in figures.variant_order(runs, family):
        n_failed = int(((family_runs["variant"] == variant) & (family_runs["status"] != "ok")).sum())
        row = {"variant": md_text(variant), "n": "0", "mean": "–", "ci": "–", "params": "–"}
        if variant in primary.index:
            s = primary.loc[variant]
            row.update(
                n=str(int(s["n"])),
                mean=fmt_percent(s["mean"]),
                ci=fmt_interval(s["ci_low"], s["ci_high"], fmt_percent),
            )
        if item_summary is not None and len(item_summary):
            # The crossed items x seeds interval (logit scale, inside 0-100 %) where the runs kept predictions.
            found = item_summary[(item_summary["family"] == family) & (item_summary["variant"] == variant)
                                 & (item_summary["split"] == PRIMARY_SPLIT)]
            if len(found) and finite(found.iloc[0]["ci_low"]):
                row["ci"] = fmt_interval(found.iloc[0]["ci_low"], found.iloc[0]["ci_high"], fmt_percent) + " (items)"
        if n_failed:
            row["n"] += f" ({n_failed} failed)"
        if variant in params.index:
            row["params"] = fmt_count(params.loc[variant, "mean"])
        else:
            counts = family_runs.loc[family_runs["variant"] == variant, "trainable_params"].dropna()
            row["params"] = (
                fmt_count(counts.iloc[0]) if "trainable_params" in family_runs and len(counts) else "–"
            )
        is_baseline = bool(
            family_runs.loc[family_runs["variant"] == variant, "is_baseline"].astype(bool).any()
        )
        if is_baseline:
            row.update(diff="baseline", p="", verdict="")
        elif variant in family_tests.index:
            t = family_tests.loc[variant]
            diff = fmt_points(t["diff"])
            interval = fmt_interval(t["diff_ci_low"], t["diff_ci_high"], fmt_points)
            row.update(test_cells(t, f"{diff} {interval}" if interval != "–" else diff))
        else:
            row.update(NOT_TESTED)
        rows.append(row)
    return rows


def conditions_section(family: str, tables: dict) -> dict | None:
    """The accuracy table's context, or None where the family shows no accuracy (``common.show_accuracy``)."""
    if not show_accuracy(family, tables):
        return None
    return {"rows": condition_rows(family, tables["runs"], tables["summary"], tables["tests"],
                                   tables.get("item_summary"))}


PART = SectionPart("conditions.md.j2", conditions_section)

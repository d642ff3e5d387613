"""The section part of an epochs family: final accuracy at the best-validation epoch, then every epoch against
epoch 1 of the same variant."""

from __future__ import annotations

import pandas as pd

from lora_bench.analysis.items import epoch_condition
from lora_bench.report import figures
from lora_bench.report.formatting import (
    finite,
    fmt_interval,
    fmt_p,
    fmt_percent,
    fmt_points,
    md_text,
    points_interval,
)
from lora_bench.report.sections.common import NOT_TESTED, PRIMARY_SPLIT, SectionPart, test_cells
from lora_bench.report.sections.conditions import condition_rows


def epoch_rows(family: str, runs: pd.DataFrame, summary: pd.DataFrame, tests: pd.DataFrame,
               item_tests: pd.DataFrame | None = None) -> list[dict]:
    """One row per variant x epoch; against epoch 1 by the seed-level test, and by the crossed questions x seeds
    test (``items``) where the runs kept their answers after every epoch."""
    per_epoch = summary[
        (summary["family"] == family) & (summary["stage"] == "epoch") & (summary["metric"] == "accuracy")
    ]
    epoch_tests = tests[
        (tests["family"] == family) & (tests["metric"] == "accuracy") & (tests["split"] == PRIMARY_SPLIT)
    ].set_index("variant")
    item_tests = item_tests if item_tests is not None else pd.DataFrame(columns=["family", "split", "variant"])
    by_items = item_tests[(item_tests["family"] == family)
                          & (item_tests["split"] == PRIMARY_SPLIT)].set_index("variant")
    rows = []
    for variant in figures.variant_order(runs, family):
        part = per_epoch[per_epoch["variant"] == variant]
        for epoch in sorted({int(e) for e in part["epoch"].dropna()}):
            cells = {"variant": md_text(variant), "epoch": str(epoch)}
            for split in ("validation", "test"):
                match = part[(part["split"] == split) & (part["epoch"] == epoch)]
                if len(match):
                    s = match.iloc[0]
                    cells["n"] = str(int(s["n"]))
                    cells[split] = (
                        f"{fmt_percent(s['mean'])} {fmt_interval(s['ci_low'], s['ci_high'], fmt_percent)}"
                    )
                else:
                    cells[split] = "–"
            cells.setdefault("n", "0")
            key = epoch_condition(variant, epoch)
            # Not "items": Jinja would read row.items as the dict method.
            cells["by_questions"] = "" if epoch == 1 else _item_cell(by_items, key)
            if epoch == 1:
                cells.update(diff="reference", p="", verdict="")
            elif key in epoch_tests.index:
                t = epoch_tests.loc[key]
                cells.update(test_cells(t, f"{fmt_points(t['diff'])} {points_interval(t)}"))
            else:
                cells.update(NOT_TESTED)
            rows.append(cells)
    return rows


def _item_cell(by_items: pd.DataFrame, key: str) -> str:
    """'+2.50 [+0.40, +4.60], p = 0.02 (better)' by the crossed questions x seeds test, or '–' without one."""
    if key not in by_items.index or not finite(by_items.loc[key, "p_value"]):
        return "–"
    t = by_items.loc[key]
    return f"{fmt_points(t['diff'])} {points_interval(t)}, p {fmt_p(t['p_holm'])} ({t['verdict']})"


def epochs_section(family: str, tables: dict) -> dict:
    runs, summary, tests = tables["runs"], tables["summary"], tables["tests"]
    rows = epoch_rows(family, runs, summary, tests, tables.get("item_tests"))
    return {"final_rows": condition_rows(family, runs, summary, tests.iloc[0:0]), "epoch_rows": rows,
            "by_items": any(row["by_questions"] not in ("", "–") for row in rows)}


PART = SectionPart("epochs.md.j2", epochs_section)

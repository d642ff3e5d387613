"""The section part of a memory_time family (QLoRA vs LoRA vs full): memory, step time and throughput per variant
from ``cost_summary``, their ratios to the baseline with Fieller intervals, one sentence per variant, and ours / peft.
"""

from __future__ import annotations

import pandas as pd

from lora_bench.analysis.cost import (
    IMPL_RATIO_BLOCKS,
    IMPL_RATIO_PARTS,
    MEMORY_TIME_TIME_METRIC,
)
from lora_bench.report.formatting import GIB, MIB, finite, fmt_count, fmt_ratio, fmt_scaled, md_text, mean_and_interval
from lora_bench.report.sections.common import (
    MEMORY_LABELS,
    SectionPart,
    cost_by_variant,
    cost_test,
    family_costs,
    ratio_cells,
    ratio_phrase,
    runs_cell,
)


def _memory_time_claim(family: str, variant: str, baseline: str, tests: pd.DataFrame, memory: str) -> str:
    """One sentence per variant: its memory and time per step as multiples of the baseline's."""
    name, base = f"**{md_text(variant)}**", f"**{md_text(baseline)}**"
    memory_test = cost_test(tests, family, variant, memory) if memory else None
    time_test = cost_test(tests, family, variant, MEMORY_TIME_TIME_METRIC)
    time_what = "takes {ratio} the time per step" + ("" if memory_test is not None else " of {baseline}")
    parts = [
        ratio_phrase(memory_test, "uses {ratio} the memory of {baseline}", base, MEMORY_LABELS.get(memory, memory)),
        ratio_phrase(time_test, time_what, base),
    ]
    parts = [part for part in parts if part]
    if not parts:
        reason = "too few finished runs" if memory_test is None and time_test is None else "no ratio"
        return f"{name} vs {base}: memory and time were not compared ({reason})."
    reference_test = time_test if time_test is not None else memory_test
    if bool(reference_test["paired"]):
        n = f"n = {int(reference_test['n_pairs'])} seed pairs"
    else:
        n = f"n = {int(reference_test['n_variant'])} vs {int(reference_test['n_baseline'])} runs"
    return f"{name} {' and '.join(parts)}; {n}."


def _impl_rows(cost: pd.DataFrame) -> list[dict]:
    """Rows of ours / peft (``method.impl``): each variant with our layers beside its twin with peft's."""
    rows = []
    if "peft_variant" not in cost.columns:  # tables written before method.impl existed
        return rows
    for variant, c in cost[cost["peft_variant"].fillna("") != ""].iterrows():
        row = {"ours": md_text(variant), "peft": md_text(c["peft_variant"])}
        for prefix in IMPL_RATIO_BLOCKS:
            ratio, low, high = (c[f"{prefix}_{part}"] for part in IMPL_RATIO_PARTS)
            row[prefix] = (fmt_ratio(ratio) + (f" ({fmt_ratio(low)} to {fmt_ratio(high)})"
                                               if finite(low) and finite(high) else "")) if finite(ratio) else "–"
        rows.append(row)
    return rows


def memory_time_section(family: str, tables: dict) -> dict:
    """Table rows, sentences and notes of a memory_time family, from ``cost_summary`` and ``tests``."""
    tests = tables["tests"]
    cost, baseline, memory = family_costs(family, tables)
    rows, claims = [], []
    for variant, c in cost_by_variant(family, tables, cost):
        method = str(c["method"] or "")
        n = runs_cell(c)
        row = {
            "variant": md_text(variant),
            "method": md_text(method or "–"),
            "model": md_text(c["model"] or "–"),
            "optimizer": md_text(c["optimizer"] or "–"),
            "targets": "all weights" if method == "full" else md_text(c["targets"] or "–"),
            "seq_length": md_text(c["seq_length"] or "–"),
            "n": n,
            "memory": mean_and_interval(c["memory_mean"], c["memory_ci_low"], c["memory_ci_high"], GIB),
            "time": mean_and_interval(
                c["median_step_time_mean"], c["median_step_time_ci_low"], c["median_step_time_ci_high"], 1e-3
            ),
            "tokens": fmt_count(c["tokens_per_second_mean"]),
            "base_weights": fmt_scaled(c["base_weight_bytes_mean"], MIB),
        }
        if variant == baseline:
            row.update(memory_ratio="baseline", memory_p="", time_ratio="baseline", time_p="")
        else:
            memory_test = cost_test(tests, family, variant, memory) if memory else None
            time_test = cost_test(tests, family, variant, MEMORY_TIME_TIME_METRIC)
            row["memory_ratio"], row["memory_p"] = ratio_cells(memory_test)
            row["time_ratio"], row["time_p"] = ratio_cells(time_test)
            if baseline:
                claims.append(_memory_time_claim(family, variant, baseline, tests, memory))
        rows.append(row)
    settings = []
    for label, column in (("device", "device"), ("precision", "precision")):
        values = [str(v) for v in dict.fromkeys(cost[column]) if v] if len(cost) else []
        if values:
            settings.append(f"{label}: {md_text(', '.join(values))}")
    return {
        "rows": rows,
        "impl_rows": _impl_rows(cost),
        "claims": claims,
        "memory_label": md_text(MEMORY_LABELS.get(memory, memory or "not recorded")),
        "memory_metric": memory,
        "settings": "; ".join(settings),
    }


PART = SectionPart("memory_time.md.j2", memory_time_section, cost_headline=True)

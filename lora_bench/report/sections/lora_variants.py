"""The section part of a lora_variants family (DoRA, LoRA+, inits): each variant's accuracy and costs, shipping and
serving included, against LoRA."""

from __future__ import annotations

import math

from lora_bench.analysis.cost import (
    MEMORY_TIME_TIME_METRIC,
)
from lora_bench.report.formatting import (
    KIB,
    MIB,
    finite,
    fmt_points,
    fmt_ratio,
    fmt_scaled,
    md_text,
    mean_and_interval,
    p_phrase,
    points_interval,
    ratio_and_interval,
)
from lora_bench.report.sections.common import (
    MEMORY_LABELS,
    PRIMARY_METRIC,
    PRIMARY_SPLIT,
    SectionPart,
    cost_by_variant,
    cost_test,
    family_costs,
    ratio_cells,
    ratio_phrase,
    runs_cell,
)


def _accuracy_phrase(test) -> str:
    """'test accuracy +0.40 points (95% CI -0.5 to 1.3; Holm p = 0.61)', or why it was not compared."""
    if test is None:
        return "test accuracy not compared (too few finished runs)"
    if not finite(test["p_value"]):
        return f"test accuracy {fmt_points(test['diff'])} points (not tested: {md_text(test['note']) or 'no p-value'})"
    return (f"test accuracy {fmt_points(test['diff'])} points (95% CI {points_interval(test)}; "
            f"Holm {p_phrase(test['p_holm'])})")


def _lora_variants_claim(family: str, variant: str, baseline: str, tables: dict, memory: str, cost,
                         base_cost) -> str:
    """One sentence per variant: accuracy difference, time and memory ratios, adapter size and serving overhead."""
    tests = tables["tests"]
    name, base = f"**{md_text(variant)}**", f"**{md_text(baseline)}**"
    accuracy = tests[(tests["family"] == family) & (tests["variant"] == variant)
                     & (tests["metric"] == PRIMARY_METRIC) & (tests["split"] == PRIMARY_SPLIT)]
    parts = [
        _accuracy_phrase(accuracy.iloc[0] if len(accuracy) else None),
        ratio_phrase(cost_test(tests, family, variant, MEMORY_TIME_TIME_METRIC),
                      "{ratio} the time per training step", base),
        ratio_phrase(cost_test(tests, family, variant, memory) if memory else None, "{ratio} the memory", base,
                      MEMORY_LABELS.get(memory, memory)),
        ratio_phrase(cost_test(tests, family, variant, "adapter_bytes"),
                      "an adapter file {ratio} as large" + (f" ({fmt_scaled(cost['adapter_bytes_mean'], KIB)} KiB)"
                                                            if cost is not None else ""), base),
    ]
    if cost is not None and finite(cost["inference_overhead_mean"]):
        baseline_cost = base_cost["inference_overhead_mean"] if base_cost is not None else math.nan
        parts.append(f"served unmerged it takes {fmt_ratio(cost['inference_overhead_mean'])} the merged model's "
                     f"time per example ({base}: {fmt_ratio(baseline_cost)})")
    parts = [part for part in parts if part]
    return f"{name} vs {base}: " + "; ".join(parts) + "."


def lora_variants_section(family: str, tables: dict) -> dict:
    """Table rows and one sentence per variant of a lora_variants family, from ``cost_summary`` and ``tests``."""
    tests = tables["tests"]
    cost, baseline, memory = family_costs(family, tables)
    rows, claims = [], []
    for variant, c in cost_by_variant(family, tables, cost):
        row = {
            "variant": md_text(variant),
            "n": runs_cell(c),
            "time": mean_and_interval(c["median_step_time_mean"], c["median_step_time_ci_low"],
                                       c["median_step_time_ci_high"], 1e-3),
            "memory": mean_and_interval(c["memory_mean"], c["memory_ci_low"], c["memory_ci_high"], MIB),
            "adapter": mean_and_interval(c["adapter_bytes_mean"], c["adapter_bytes_ci_low"],
                                          c["adapter_bytes_ci_high"], KIB),
            "overhead": ratio_and_interval(c["inference_overhead_mean"], c["inference_overhead_ci_low"],
                                            c["inference_overhead_ci_high"]),
            "latency": mean_and_interval(c["inference_latency_unmerged_mean"], c["inference_latency_unmerged_ci_low"],
                                          c["inference_latency_unmerged_ci_high"], 1e-3),
        }
        if variant == baseline:
            row.update(time_ratio="baseline", memory_ratio="baseline", adapter_ratio="baseline")
        else:
            row["time_ratio"] = ratio_cells(cost_test(tests, family, variant, MEMORY_TIME_TIME_METRIC))[0]
            row["memory_ratio"] = ratio_cells(cost_test(tests, family, variant, memory) if memory else None)[0]
            row["adapter_ratio"] = ratio_cells(cost_test(tests, family, variant, "adapter_bytes"))[0]
            if baseline:
                claims.append(_lora_variants_claim(family, variant, baseline, tables, memory, c,
                                                   cost.loc[baseline] if baseline in cost.index else None))
        rows.append(row)
    return {"rows": rows, "claims": claims, "baseline": md_text(baseline or "none"),
            "memory_label": md_text(MEMORY_LABELS.get(memory, memory or "not recorded"))}


PART = SectionPart("lora_variants.md.j2", lora_variants_section)

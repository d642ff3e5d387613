"""Reference results: each published number (``lora_bench.report.reference``) beside ours, whether it lies inside
our 95 % interval, and whether the setting is the same at all (the published figures comparison)."""

from __future__ import annotations

import math
import re

import pandas as pd

from lora_bench.analysis.columns import cfg
from lora_bench.analysis.compare import baseline_variant, welch_from_summary
from lora_bench.analysis.cost import (
    MEMORY_TIME_MEMORY_METRICS,
    MEMORY_TIME_TIME_METRIC,
)
from lora_bench.analysis.summary import ALPHA, prediction_interval
from lora_bench.report import reference
from lora_bench.report.formatting import (
    finite,
    fmt_interval,
    fmt_percent,
    fmt_points,
    fmt_ratio,
    fmt_value,
    md_text,
    p_phrase,
)
from lora_bench.report.sections.common import cost_summary, cost_test, data_description, is_exact, unique_text
from lora_bench.study import kind_spec


def _normalise(text: str) -> str:
    return re.sub(r"[^a-z0-9]", "", text.lower())


def _relevant_runs(runs: pd.DataFrame, refs: list[reference.ReferenceResult]) -> pd.DataFrame:
    """Our runs of the family kinds a setting's numbers map to (all runs when the study has none of those)."""
    kinds = {r.ours_kind for r in refs if r.ours_kind}
    relevant = runs[runs["family_kind"].isin(kinds)]
    return relevant if len(relevant) else runs


def _setting_matches(setting: reference.Setting, runs: pd.DataFrame) -> bool | None:
    """Whether our runs used the setting's model, data and device; None when the runs table cannot tell.

    Every model name of ours must be the setting's (a study mixing a tiny and a 7B model is not "the
    same setting"); the data need to match only when the setting names data (``data_keys``), and the
    device only when it names devices (``device_keys``, e.g. CUDA for GPU memory and time).
    """
    models = unique_text(runs, cfg("model.name")) or unique_text(runs, cfg("model.source"))
    datasets = unique_text(runs, cfg("data.name")) + unique_text(runs, cfg("data.source"))
    devices = unique_text(runs, "device")
    if not models or (setting.data_keys and not datasets) or (setting.device_keys and not devices):
        return None
    model_keys = [_normalise(k) for k in setting.model_keys]
    same_model = all(any(k in _normalise(m) for k in model_keys) for m in models)
    data_text = _normalise(" ".join(datasets))
    same_data = not setting.data_keys or any(_normalise(k) in data_text for k in setting.data_keys)
    same_device = not setting.device_keys or all(any(k in d.lower() for k in setting.device_keys) for d in devices)
    return same_model and same_data and same_device


# Relative-change references are computed from these metrics of ours (first present wins).
CHANGE_METRICS = {
    "peak_memory_change": ("peak_cuda_allocated", "peak_rss"),
    "wall_time_change": ("wall_time",),
    "memory_ratio": ("peak_cuda_allocated", "peak_rss"),
    "step_time_ratio": ("median_step_time",),
}


# In memory_time families the memory references use the family's memory metric and the time references the
# median step time (setup and evaluation would blur a wall-clock ratio).
MEMORY_REFERENCES = ("peak_memory_change", "memory_ratio")


TIME_REFERENCES = ("wall_time_change", "step_time_ratio")


RATIO_UNITS = ("relative", "ratio")


def _our_condition(ref: reference.ReferenceResult, runs: pd.DataFrame) -> tuple[str, str] | None:
    """(family, variant) of ours that a reference number corresponds to, if the study ran one."""
    families = runs.loc[runs["family_kind"] == ref.ours_kind, "family"].unique()
    for family in families:
        family_runs = runs[runs["family"] == family]
        variants = list(dict.fromkeys(family_runs["variant"]))
        if ref.ours_variant and ref.ours_variant in variants:
            return family, ref.ours_variant
        if ref.ours_method and "method" in family_runs.columns:
            with_method = list(
                dict.fromkeys(family_runs.loc[family_runs["method"] == ref.ours_method, "variant"])
            )
            baseline = baseline_variant(runs, family)[0]
            if len(with_method) == 1:
                return family, with_method[0]
            if baseline in with_method:
                return family, baseline
    return None


def _reference_row(ref: reference.ReferenceResult, tables: dict, same_setting: bool | None = None) -> dict:
    """One row of a reference table: the published number, ours, and whether they agree.

    ``same_setting`` (from ``_setting_matches``) matters for settings whose absolute numbers are
    comparable only in the same setting: elsewhere they are shown but not compared.
    """
    runs, summary = tables["runs"], tables["summary"]
    row = {
        "label": md_text(ref.label),
        "what": md_text(
            f"{ref.split} {ref.metric.replace('_', ' ')}"
            if ref.split != "none"
            else ref.metric.replace("_", " ")
        ),
        "reference": _format_reference(ref),
        "ours": "not run here",
        "condition": "–",
        "verdict": "no counterpart in this study",
        "matched": False,
    }
    condition = _our_condition(ref, runs)
    if condition is None:
        return row
    family, variant = condition
    row["condition"] = md_text(f"{family}/{variant}")
    if ref.unit in RATIO_UNITS:
        return _ratio_reference_row(ref, row, family, variant, tables)
    ours = summary[
        (summary["family"] == family)
        & (summary["variant"] == variant)
        & (summary["metric"] == ref.metric)
        & (summary["split"] == ref.split)
        & (summary["stage"] == "final")
    ]
    if ours.empty:
        row["ours"] = "not measured"
        row["verdict"] = "our runs did not record this metric"
        return row
    s = ours.iloc[0]
    if reference.SETTINGS[ref.setting].absolute_needs_same_setting and same_setting is not True:
        row["ours"] = fmt_value(s["mean"], str(s["unit"])) + f", n = {int(s['n'])}"
        row["verdict"] = "setting differs: absolute values not compared (see the ratios)"
        return row
    scale = UNIT_CONVERSIONS.get((ref.unit, str(s["unit"])))
    if scale is None:
        row["ours"] = fmt_value(s["mean"], str(s["unit"]))
        row["verdict"] = f"units differ ({ref.unit} vs {s['unit']}); not compared"
        return row
    return _compare_absolute(ref, row, s, scale)


def _compare_absolute(ref: reference.ReferenceResult, row: dict, s: pd.Series, scale: float) -> dict:
    """``row`` with our mean and interval of summary row ``s`` (converted to the reference's unit by ``scale``) and
    the verdict: inside or outside our 95 % interval, with a Welch test where the reference gives its spread."""
    row["matched"] = True
    n = int(s["n"])
    mean, low, high, std = (
        float(s[c]) * scale if finite(s[c]) else math.nan for c in ("mean", "ci_low", "ci_high", "std")
    )
    if ref.unit == "count":
        row["ours"] = f"{fmt_value(mean, ref.unit)}, n = {n}"
        same = round(mean) == round(ref.value)
        row["verdict"] = "identical" if same else f"differs: ours / theirs = {mean / ref.value:.3g}"
        return row
    interval = fmt_interval(low, high, lambda x: fmt_value(x, ref.unit))
    row["ours"] = f"{fmt_value(mean, ref.unit)} {interval if interval != '–' else ''}".strip() + f", n = {n}"
    if not (finite(low) and finite(high)):
        row["verdict"] = "ours has no interval (fewer than 2 runs)"
        return row
    gap = mean - ref.value
    gap_text = (
        fmt_points(gap) + " points" if ref.unit == "fraction" else fmt_value(gap, ref.unit).replace("-", "−")
    )
    if low <= ref.value <= high:
        verdict = "inside our 95% CI"
    else:
        verdict = f"outside our 95% CI (ours {'higher' if gap > 0 else 'lower'} by {gap_text.lstrip('+−')})"
    if ref.std is not None and ref.n_runs >= 2:
        # Both sides are means over seeds: ask whether they differ beyond both spreads.
        p = welch_from_summary(mean, std, n, ref.value, ref.std, ref.n_runs)
        if finite(p):
            verdict += f"; Welch t on both means and spreads: {p_phrase(p)}"
            verdict += ", consistent" if p >= ALPHA else ", they differ"
    elif not (low <= ref.value <= high):
        # A published single run scatters by the whole seed-to-seed spread, not by the standard error.
        single_low, single_high = prediction_interval(mean, std, n)
        if finite(single_low) and single_low <= ref.value <= single_high:
            verdict += "; but within the 95% range of a single run of ours"
    row["verdict"] = verdict
    return row


# (reference unit, our unit) -> factor from ours to theirs
UNIT_CONVERSIONS = {
    ("fraction", "fraction"): 1.0,
    ("count", "count"): 1.0,
    ("s", "s"): 1.0,
    ("GiB", "bytes"): 2.0**-30,
}


def _ratio_metrics(ref: reference.ReferenceResult, family: str, kind: str, tables: dict) -> list[str]:
    """Our metrics a relative / ratio reference may be computed from, first choice first."""
    # A cost-only family (memory_time) compares memory with its own memory metric and time with the step time.
    if kind_spec(kind).cost_only and ref.metric in MEMORY_REFERENCES:
        cost = cost_summary(tables)
        memory = next((str(m) for m in cost.loc[cost["family"] == family, "memory_metric"] if m), "")
        return [memory] if memory else list(MEMORY_TIME_MEMORY_METRICS)
    if kind_spec(kind).cost_only and ref.metric in TIME_REFERENCES:
        return [MEMORY_TIME_TIME_METRIC]
    return list(CHANGE_METRICS.get(ref.metric, ()))


def _cost_means(tables: dict, family: str, variant: str, versus: str, metric: str) -> tuple[float, float]:
    """Means of ``metric`` for two variants of a memory_time family from ``cost_summary`` (NaN if absent)."""
    cost = cost_summary(tables)
    cost = cost[cost["family"] == family].set_index("variant")
    if variant not in cost.index or versus not in cost.index:
        return math.nan, math.nan
    prefix = "memory" if metric == cost.loc[variant, "memory_metric"] else metric
    column = f"{prefix}_mean"
    if column not in cost.columns:
        return math.nan, math.nan
    return float(cost.loc[variant, column]), float(cost.loc[versus, column])


def _ratio_reference_row(
    ref: reference.ReferenceResult, row: dict, family: str, variant: str, tables: dict
) -> dict:
    """A relative change or ratio of the reference (e.g. QLoRA vs LoRA memory) beside ours, as ratios.

    Ours is the tests table's ratio with its Fieller interval when ``ours_versus`` is the family's baseline;
    otherwise the ratio of the two means from ``cost_summary``, without an interval.
    """
    runs, tests = tables["runs"], tables["tests"]
    kind = str(runs.loc[runs["family"] == family, "family_kind"].iloc[0])
    versus = ref.ours_versus or baseline_variant(runs, family)[0] or ""
    theirs = ref.value + 1 if ref.unit == "relative" else ref.value
    for metric in _ratio_metrics(ref, family, kind, tables):
        condition = md_text(f"{family}/{variant} vs {versus} ({metric.replace('_', ' ')})")
        t = cost_test(tests, family, variant, metric, versus)
        if t is not None and finite(t["mean_baseline"]) and t["mean_baseline"]:
            if finite(t.get("ratio")):
                ratio, low, high, approx = t["ratio"], t.get("ratio_ci_low"), t.get("ratio_ci_high"), ""
            else:  # a tests table from before the ratio columns: the difference's interval over the baseline
                base = t["mean_baseline"]
                ratio, low, high = 1 + t["diff"] / base, 1 + t["diff_ci_low"] / base, 1 + t["diff_ci_high"] / base
                approx = "approx. "
            row.update(matched=True, condition=condition)
            interval = "" if is_exact(t) else fmt_interval(low, high, fmt_ratio)
            relative = fmt_value(float(ratio) - 1, "relative")
            row["ours"] = " ".join(x for x in (fmt_ratio(ratio), interval, f"({relative})") if x and x != "–")
            if is_exact(t):
                same = math.isclose(float(ratio), theirs, rel_tol=5e-3)
                row["verdict"] = "ours is exact (identical in every run): " + (
                    "the same" if same else f"ours {'higher' if ratio > theirs else 'lower'}"
                )
            elif finite(low) and finite(high):
                inside = float(low) <= theirs <= float(high)
                row["verdict"] = (
                    f"inside our {approx}95% CI"
                    if inside
                    else f"outside our {approx}95% CI (ours {'higher' if ratio > theirs else 'lower'})"
                )
            else:
                row["verdict"] = "ours has no interval"
            if ref.metric == "wall_time_change" and metric == MEMORY_TIME_TIME_METRIC:
                row["verdict"] += "; ours is time per step, theirs total training time"
            if metric == "state_bytes":
                row["verdict"] += "; ours counts weights, gradients and optimizer state, theirs peak memory"
            return row
        mean, mean_versus = _cost_means(tables, family, variant, versus, metric)
        if finite(mean) and finite(mean_versus) and mean_versus:
            row.update(matched=True, condition=condition)
            row["ours"] = f"{fmt_ratio(mean / mean_versus)} ({fmt_value(mean / mean_versus - 1, 'relative')})"
            row["verdict"] = f"ours has no interval: {md_text(versus)} is not this family's baseline, so not tested"
            return row
    row["ours"] = "not measured"
    row["verdict"] = "our runs did not record this metric, or not for both variants"
    return row


def _format_reference(ref: reference.ReferenceResult) -> str:
    if ref.unit == "relative":
        return f"{fmt_value(ref.value, 'relative')} ({fmt_ratio(ref.value + 1)})"
    if ref.unit == "ratio":
        return fmt_ratio(ref.value)
    if ref.std is None:
        return fmt_value(ref.value, ref.unit)
    if ref.unit == "fraction":
        return f"{fmt_percent(ref.value, 1)} ± {ref.std * 100:.1f} % (n = {ref.n_runs})"
    return f"{fmt_value(ref.value, ref.unit)} ± {ref.std:.3g} (n = {ref.n_runs})"


def _setting_verdict(
    setting: reference.Setting, refs: list[reference.ReferenceResult], runs: pd.DataFrame, match: bool | None
) -> str:
    """Whether the reference's setting is ours, in words, and what that means for the comparison."""
    ours_model = ", ".join(unique_text(runs, cfg("model.name"))) or "unknown model"
    ours_where = data_description(runs)
    if setting.device_keys:
        ours_where += f", on {', '.join(unique_text(runs, 'device')) or 'an unknown device'}"
    only_ratios = setting.absolute_needs_same_setting or all(r.unit in RATIO_UNITS for r in refs)
    details = f" (theirs: {md_text(setting.details)})" if setting.details else ""
    if match is True and setting.device_keys and not setting.data_keys:
        return (
            f"Same model config as ours ({md_text(setting.model)}) on a CUDA device, so the absolute numbers are a "
            f"check; the GPU model, sequence length, batch, precision and library versions may still differ"
            f"{details}: ours are in the Setup section and the family's memory and time table."
        )
    if match is True:
        return (
            "Same model and data source as ours, so these numbers are a direct check; data size, "
            "sequence length, recipe, hardware and library versions may still differ (ours are in "
            f"the Setup section){details}."
        )
    if match is False:
        tail = (
            " Absolute memory and time depend on the model's size, sequence length, batch and hardware, so only "
            "the ratios (QLoRA vs LoRA) are compared, and even those are context, not a replication test."
            if only_ratios
            else " The comparison gives context, it is not a replication test, and a reference value outside "
            "our interval is expected."
        )
        return (
            f"**Setting differs**: the reference used {md_text(setting.model)} on {md_text(setting.data)} "
            f"({md_text(setting.hardware)}); we ran {md_text(ours_model)} on {md_text(ours_where)}.{tail}"
        )
    return (
        "Our runs table does not record the model, data or device, so whether the setting matches is unknown."
        + (" Only the ratios are compared." if only_ratios else "")
    )


def reference_sections(tables: dict) -> list[dict]:
    runs = tables["runs"]
    sections = []
    for setting in reference.SETTINGS.values():
        refs = reference.results_for(setting.key)
        if not refs:
            continue
        relevant = _relevant_runs(runs, refs)
        match = _setting_matches(setting, relevant)
        verdict = _setting_verdict(setting, refs, relevant, match)
        rows = [_reference_row(ref, tables, match) for ref in refs]
        sections.append(
            {
                "title": md_text(setting.title),
                "sources": md_text("; ".join(dict.fromkeys(r.source for r in refs))),
                "model": md_text(setting.model),
                "data": md_text(setting.data),
                "hardware": md_text(setting.hardware),
                "runs": md_text(setting.runs),
                "same_setting": match,
                "setting_verdict": verdict,
                "rows": rows,
                "any_matched": any(r["matched"] for r in rows),
                "kinds": sorted({r.ours_kind for r in refs if r.ours_kind}),
                "notes": [md_text(n) for n in dict.fromkeys(f"{r.label}: {r.note}" for r in refs if r.note)],
            }
        )
    return sections

"""Cost: memory, time and serving of the families whose kind compares cost (``KindSpec.cost_metrics``).

- **Memory and time families** (kind ``memory_time``: QLoRA vs LoRA vs full finetuning) measure cost,
  not accuracy, and may have no accuracy rows at all. Besides the metrics every family gets, each
  variant is compared with the baseline on the family's *memory metric* (``peak_cuda_allocated`` when
  the family recorded it, i.e. ran on a GPU, else the exact ``state_bytes``: weights + gradients +
  optimizer state), on ``median_step_time``, ``tokens_per_second`` and ``base_weight_bytes``, with the
  same machinery (paired when seeds are shared, Holm within family and metric). ``cost_summary``
  gives their means and intervals per variant, beside the method, model, optimizer, LoRA targets,
  sequence length, precision and device of each variant. In these families a metric without rows
  from finished runs (accuracy, typically) simply gets no comparison, instead of rows of NaN.
- **Ours / peft**: a variant run with our layers beside its twin run with peft's (``method.impl``) in one family
  gets the ratio of their costs with its Fieller interval (``ours_over_peft``).
"""

from __future__ import annotations

import math

import pandas as pd

from lora_bench.analysis.columns import cfg
from lora_bench.analysis.compare import compare_to_baseline, ratio_interval
from lora_bench.analysis.summary import by_seed, family_order, ok_rows, present, select_values, summarize
from lora_bench.study import MEMORY_TIME_OTHER_METRICS, kind_spec, kinds_where

# The memory metric of a memory_time family: the first one the family recorded. Peak allocated CUDA memory
# is what a GPU user pays; without a GPU, the exact bytes of weights + gradients + optimizer state are the
# part of memory that the method decides (the process's peak RSS is mostly the Python runtime).
MEMORY_TIME_MEMORY_METRICS = ("peak_cuda_allocated", "state_bytes")
MEMORY_TIME_TIME_METRIC = "median_step_time"


# ----------------------------------------------------------------------------------------------------
# Which metrics


def memory_metric(metrics: pd.DataFrame, family: str) -> str | None:
    """The memory metric of a family: the first of ``MEMORY_TIME_MEMORY_METRICS`` with ok-run rows."""
    rows = ok_rows(metrics)
    rows = rows[(rows["family"] == family) & (rows["split"] == "none") & (rows["stage"] == "final")]
    recorded = set(rows["metric"])
    return next((m for m in MEMORY_TIME_MEMORY_METRICS if m in recorded), None)


def cost_metrics(metrics: pd.DataFrame, family: str) -> list[str]:
    """The cost metrics compared in a family whose kind has ``cost_metrics``: memory metric, step time, then the
    kind's own (memory_time: tokens/s, base weights; lora_variants: adapter bytes, inference overhead and latency).
    A family without rows, or of a kind without cost metrics, gets those of memory_time."""
    memory = memory_metric(metrics, family)
    kinds = metrics.loc[metrics["family"] == family, "family_kind"]
    own = kind_spec(str(kinds.iloc[0])).cost_metrics if len(kinds) else None
    others = MEMORY_TIME_OTHER_METRICS if own is None else own
    return ([memory] if memory else []) + [MEMORY_TIME_TIME_METRIC, *others]


def cost_families(runs: pd.DataFrame) -> list[str]:
    """Families whose kind compares cost (``KindSpec.cost_metrics``), in config order."""
    if "family_kind" not in runs:
        return []
    return family_order(runs[runs["family_kind"].isin(kinds_where(lambda spec: spec.cost_metrics is not None))])


def cost_tests(
    metrics: pd.DataFrame, runs: pd.DataFrame, done: set[tuple[str, str]]
) -> list[pd.DataFrame]:
    """Cost comparisons of the families of ``cost_families`` that ``TESTED_METRICS`` (``done``) did not
    already cover."""
    parts = []
    for family in cost_families(runs):
        family_metrics = metrics[metrics["family"] == family]
        for metric in cost_metrics(metrics, family):
            if (metric, "none") not in done and present(family_metrics, metric, "none", "final"):
                parts.append(compare_to_baseline(metrics, runs[runs["family"] == family], metric, "none"))
    return parts


# ----------------------------------------------------------------------------------------------------
# The cost summary


# Run-table columns described in the cost summary: (output column, runs columns, first present wins).
COST_DESCRIPTION = (
    ("method", (cfg("method.name"), "method")),
    ("model", (cfg("model.name"),)),
    ("model_source", (cfg("model.source"),)),
    ("optimizer", (cfg("train.optimizer"),)),
    ("targets", (cfg("method.lora.targets"),)),
    ("seq_length", (cfg("data.max_length"),)),
    ("precision", (cfg("train.precision"),)),
    ("device", ("device",)),
)
# Metric blocks of the cost summary: (column prefix, metric); the memory block's metric is per family.
COST_BLOCKS = (
    ("memory", None),
    ("median_step_time", "median_step_time"),
    ("tokens_per_second", "tokens_per_second"),
    ("base_weight_bytes", "base_weight_bytes"),
    ("state_bytes", "state_bytes"),
    ("adapter_bytes", "adapter_bytes"),
    ("inference_overhead", "inference_overhead"),
    ("inference_latency_unmerged", "inference_latency_unmerged"),
    ("inference_latency_merged", "inference_latency_merged"),
)
# ours / peft: a variant run with our layers beside the one run with peft's (``method.impl``), in one family.
IMPL_COLUMN = cfg("method.impl")
IMPL_RATIO_BLOCKS = ("memory", "median_step_time", "tokens_per_second")
IMPL_RATIO_PARTS = ("ours_over_peft", "ours_over_peft_ci_low", "ours_over_peft_ci_high")
COST_SUMMARY_COLUMNS = [
    "family", "family_kind", "variant", "is_baseline", *(name for name, _ in COST_DESCRIPTION), "n", "n_failed",
    "memory_metric",
    *(f"{prefix}_{part}" for prefix, _ in COST_BLOCKS for part in ("mean", "ci_low", "ci_high", "ci_method")),
    "seeds", "impl", "peft_variant",
    *(f"{prefix}_{part}" for prefix in IMPL_RATIO_BLOCKS for part in IMPL_RATIO_PARTS),
]  # fmt: skip


def _impl(family_runs: pd.DataFrame) -> pd.Series:
    """Each run's ``method.impl`` (records leave the default ``ours`` out of their configs)."""
    if IMPL_COLUMN not in family_runs.columns:
        return pd.Series("ours", index=family_runs.index)
    return family_runs[IMPL_COLUMN].map(lambda v: "ours" if v is None or pd.isna(v) or v == "" else str(v))


def peft_counterparts(family_runs: pd.DataFrame) -> dict[str, str]:
    """Variant with our layers -> the variant of the same family that differs from it only by ``method.impl:
    peft`` (every other resolved config key equal, the seed aside): the pairs whose ours / peft ratio is shown."""
    impl = _impl(family_runs)
    keys = [c for c in family_runs.columns if c.startswith("cfg.") and c not in (IMPL_COLUMN, cfg("seed"))]

    def signature(run: pd.Series) -> tuple:
        return tuple(as_text(run[c]) for c in keys)

    first = family_runs.assign(_impl=impl).drop_duplicates("variant")
    peft = {signature(run): run["variant"] for _, run in first[first["_impl"] == "peft"].iterrows()}
    return {run["variant"]: peft[signature(run)] for _, run in first[first["_impl"] == "ours"].iterrows()
            if signature(run) in peft}


def ours_over_peft(metrics: pd.DataFrame, family: str, ours: str, peft: str, metric: str | None):
    """(ratio, ci_low, ci_high) of ``metric``: mean of our variant over the mean of its peft twin, with the
    Fieller interval of ``ratio_interval`` (paired when both ran the same seeds)."""
    if not metric:
        return math.nan, math.nan, math.nan
    rows = select_values(metrics[metrics["family"] == family], metric, "none")
    mine, theirs = by_seed(rows[rows["variant"] == ours]), by_seed(rows[rows["variant"] == peft])
    paired = len(mine) > 1 and list(mine.index) == list(theirs.index)
    ratio, low, high, _ = ratio_interval(mine.to_numpy(), theirs.to_numpy(), paired, positive=True)  # costs
    return ratio, low, high


def _describe_setting(variant_runs: pd.DataFrame, columns: tuple[str, ...]):
    """The variant's value of the first present column; several distinct values are joined with ', '."""
    for column in columns:
        if column in variant_runs.columns:
            values = [v for v in variant_runs[column].tolist() if v is not None and not pd.isna(v) and v != ""]
            distinct = list(dict.fromkeys(values))
            if len(distinct) == 1:
                return distinct[0]
            if distinct:
                return ", ".join(str(v) for v in distinct)
    return None


def cost_summary(runs: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Per (family, variant) of the memory_time and lora_variants families: what was run and what it cost.

    One row per variant (baseline first is not enforced: config order), with the method, model, model
    source, optimizer, LoRA targets, sequence length (``cfg.data.max_length``), precision and device from
    ``runs`` (ok runs preferred), the number of ok and failed runs, and for each cost metric the mean over
    ok runs with the 95 % interval of ``summarize`` (same numbers as the summary table) and its method:
    ``memory_*`` is the family's memory metric (named in ``memory_metric``), then ``median_step_time_*``
    (s), ``tokens_per_second_*``, ``base_weight_bytes_*`` and ``state_bytes_*`` (bytes), and what shipping and
    serving the adapter costs (LoRA runs, ``adapters.serving``): ``adapter_bytes_*``, ``inference_overhead_*``
    (unmerged / merged latency) and ``inference_latency_unmerged_*`` / ``_merged_*`` (s per example). Metrics a
    run did not record are NaN. ``impl`` is whose layers the variant used (``method.impl``); a variant with our
    whose twin with peft's ran in the family (``peft_counterparts``) names it in ``peft_variant`` and gets
    ``<memory|median_step_time|tokens_per_second>_ours_over_peft`` with its 95 % Fieller interval
    (``_ci_low``, ``_ci_high``; NaN with one seed): below 1 for memory and time, above 1 for tokens/s means
    ours is cheaper. Without such families the table is empty, with these columns.
    """
    rows = []
    for family in cost_families(runs):
        family_runs = runs[runs["family"] == family]
        family_metrics = metrics[metrics["family"] == family]
        memory = memory_metric(metrics, family)
        summaries = {}
        for prefix, metric in COST_BLOCKS:
            metric = memory if prefix == "memory" else metric
            summaries[prefix] = (
                summarize(family_metrics, metric, "none").set_index("variant") if metric else pd.DataFrame()
            )
        twins = peft_counterparts(family_runs)
        impl = _impl(family_runs)
        for variant in dict.fromkeys(family_runs["variant"].tolist()):
            record = _cost_record(family_runs, family_runs[family_runs["variant"] == variant], memory, impl, twins)
            for prefix in IMPL_RATIO_BLOCKS:
                metric = memory if prefix == "memory" else prefix
                ratio = ours_over_peft(metrics, family, variant, twins[variant], metric) if variant in twins \
                    else (math.nan,) * 3
                record.update({f"{prefix}_{part}": value for part, value in zip(IMPL_RATIO_PARTS, ratio)})
            for prefix, _ in COST_BLOCKS:
                summary = summaries[prefix]
                found = variant in summary.index
                for part in ("mean", "ci_low", "ci_high"):
                    record[f"{prefix}_{part}"] = float(summary.loc[variant, part]) if found else math.nan
                record[f"{prefix}_ci_method"] = str(summary.loc[variant, "ci_method"]) if found else ""
            rows.append(record)
    table = pd.DataFrame(rows, columns=COST_SUMMARY_COLUMNS)
    for column in ("n", "n_failed"):
        table[column] = table[column].astype(int)
    table["is_baseline"] = table["is_baseline"].astype(bool)
    # Setting columns mix numbers and text across families; as text they survive parquet and CSV alike.
    for name, _ in COST_DESCRIPTION:
        table[name] = table[name].map(as_text)
    return table


def _cost_record(family_runs: pd.DataFrame, variant_runs: pd.DataFrame, memory: str | None, impl: pd.Series,
                 twins: dict[str, str]) -> dict:
    """The descriptive columns of one variant's cost-summary row: its setting, runs and implementation."""
    ok_runs = variant_runs[variant_runs["status"] == "ok"]
    described = ok_runs if len(ok_runs) else variant_runs
    variant = str(variant_runs["variant"].iloc[0])
    return {
        "family": str(family_runs["family"].iloc[0]),
        "family_kind": str(family_runs["family_kind"].iloc[0]),
        "variant": variant,
        "is_baseline": bool(variant_runs["is_baseline"].astype(bool).any()),
        **{name: _describe_setting(described, columns) for name, columns in COST_DESCRIPTION},
        "n": len(ok_runs),
        "n_failed": len(variant_runs) - len(ok_runs),
        "memory_metric": memory or "",
        "seeds": ",".join(str(int(s)) for s in sorted(ok_runs["seed"].dropna().unique())),
        "impl": ",".join(dict.fromkeys(impl[variant_runs.index])),
        "peft_variant": twins.get(variant, ""),
    }


def as_text(value) -> str:
    """A setting as text: '' when missing, whole floats without '.0' (a NaN-padded int column: 512.0)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)

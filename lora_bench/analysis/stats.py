"""The statistics stage: read the tidy tables and write ``tests``, ``summary``, ``seed_consistency`` and
``cost_summary`` (``python -m lora_bench stats``).

Only the orchestration lives here; the statistics are in ``summary`` (means and intervals), ``compare`` (tests
against the baseline), ``power`` (seeds needed) and ``cost`` (memory, time, serving). Which families get which
analysis comes from their kind's registry entry (``lora_bench.study.KINDS``).
"""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from lora_bench.analysis.compare import TESTS_COLUMNS, compare_to_baseline
from lora_bench.analysis.cost import cost_summary, cost_tests
from lora_bench.analysis.power import seed_consistency
from lora_bench.analysis.summary import SUMMARY_COLUMNS, ok_rows, present, summarize, summarize_epochs
from lora_bench.atomic import write_named_tables
from lora_bench.study import kind_spec

# Metrics whose comparisons ``run_stats`` tests when present, as (metric, split). Test accuracy is the
# primary endpoint; the others are secondary and are not corrected across metrics.
TESTED_METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "test"),
    ("accuracy", "validation"),
    ("macro_f1", "test"),
    ("loss", "test"),
    ("wall_time", "none"),
    ("median_step_time", "none"),
    ("examples_per_second", "none"),
    ("peak_rss", "none"),
    ("peak_cuda_allocated", "none"),
    ("accuracy_gain", "test"),
    ("perplexity", "test"),
)
EPOCH_METRICS: tuple[tuple[str, str], ...] = (
    ("accuracy", "train"),
    ("accuracy", "validation"),
    ("accuracy", "test"),
    ("loss", "train"),
    ("loss", "validation"),
    ("loss", "test"),
)


def all_tests(metrics: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The tests table over every metric of ``TESTED_METRICS`` present in ``metrics``, plus the cost metrics
    of memory_time and lora_variants families (``cost_metrics``)."""
    parts = []
    for metric, split in TESTED_METRICS:
        if present(metrics, metric, split, "final") or present(metrics, metric, split, "epoch"):
            parts.append(compare_to_baseline(metrics, runs, metric, split))
    parts += cost_tests(metrics, runs, set(TESTED_METRICS))
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TESTS_COLUMNS)


def all_summaries(metrics: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Final-stage summaries of every metric and split, plus per-epoch summaries for epochs families."""
    final = ok_rows(metrics)
    final = final[final["stage"] == "final"]
    parts = [
        summarize(metrics, metric, split)
        for metric, split in dict.fromkeys(zip(final["metric"], final["split"], strict=True))
    ]
    per_epoch_kinds = [k for k in runs["family_kind"].unique() if kind_spec(str(k)).epoch_summaries]
    epochs_families = runs.loc[runs["family_kind"].isin(per_epoch_kinds), "family"].unique()
    if len(epochs_families):
        per_epoch = metrics[metrics["family"].isin(epochs_families)]
        for metric, split in EPOCH_METRICS:
            if present(per_epoch, metric, split, "epoch"):
                parts.append(summarize_epochs(per_epoch, metric, split))
    # Instruct families: the zero-shot evaluation (epoch 0) every result is a gain over.
    for metric, split in (("accuracy", "test"), ("accuracy", "validation"), ("loss", "test"), ("perplexity", "test")):
        if present(metrics, metric, split, "zero_shot"):
            parts.append(summarize(metrics, metric, split, stage="zero_shot"))
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=SUMMARY_COLUMNS)


def run_stats(metrics_path: str | Path, runs_path: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Read the tidy tables and write ``tests``, ``summary``, ``seed_consistency`` and ``cost_summary``.

    Each as parquet + csv; ``cost_summary`` is written (empty, with its columns) even when the study has
    no memory_time family, so the workflow's outputs do not depend on the config.

    Returns the written paths by table name. This is what ``python -m lora_bench stats`` calls.
    """
    metrics = pd.read_parquet(metrics_path)
    runs = pd.read_parquet(runs_path)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tables = {
        "tests": all_tests(metrics, runs),
        "summary": all_summaries(metrics, runs),
        "seed_consistency": seed_consistency(metrics, runs),
        "cost_summary": cost_summary(runs, metrics),
    }
    return write_named_tables(tables, out_dir)

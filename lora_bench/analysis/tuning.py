"""Tuning with an equal budget: one key (e.g. the learning rate) chosen per variant before a comparison.

A method compared at one hand-picked learning rate may only be further from its own best rate. A family with a
``tune`` block (see study.schema.yaml) therefore first runs every variant at every value of the same grid, on
the same tuning seeds, with the same epochs and steps, scored on the **validation split only** (tuning runs do
not evaluate the test split at all), and then compares the variants on its own seeds, each at its chosen value.

``select_tuned`` picks, per variant, the value with the highest mean validation score over the tuning seeds;
ties go to the smaller value (for a learning rate: the gentler setting). Failed tuning runs count as missing;
a value none of whose runs finished cannot be chosen. The workflow's ``select_tune`` checkpoint writes the
selection as JSON (``results/tune/<family>/selection.json``) and the family's runs are derived from it.
``tuning_table`` is the tidy table of every (family, variant, value) score the report and figure read.

**Edges.** A value chosen at the end of its grid (the smallest or the largest tried), with a better score than
the value next to it, says only that the best value is there *or beyond*: the variant may be further from its
own best rate than the others. ``chosen_edge`` ("low" / "high", empty inside the grid or on a flat end) marks it
in the table and the selection, and the report's findings state it beside every comparison of that variant, so
the grid can be widened in that direction; ``tune.extend`` does so round by round (``extension``: a value beyond
the base grid, run because a round's selection chose that end).
"""

from __future__ import annotations

import math
from pathlib import Path

import pandas as pd

from lora_bench.analysis.columns import cfg
from lora_bench.analysis.summary import family_order, select_values
from lora_bench.atomic import write_named_tables
from lora_bench.study import TUNE_KIND

# The tune block's metric -> (metric, split) of the tidy metrics table.
TUNE_METRICS = {"validation_accuracy": ("accuracy", "validation"), "validation_macro_f1": ("macro_f1", "validation")}
TUNING_COLUMNS = ["family", "tuning_family", "setting", "key", "value", "extension", "metric", "n_runs", "n_failed",
                  "mean", "std", "chosen", "chosen_edge", "optimizer_steps", "epochs"]


def flags(frame: pd.DataFrame, column: str) -> pd.Series:
    """``column`` of ``frame`` as booleans, False where missing and where the column is absent: records and
    tables made before ``tune.extend`` have no ``tune_extension`` / ``extension`` column, and every value of
    theirs is of a base grid."""
    if column not in frame:
        return pd.Series(False, index=frame.index)
    return frame[column].fillna(False).astype(bool)


def tuning_scores(runs: pd.DataFrame, metrics: pd.DataFrame, tuning_family: str, metric: str) -> pd.DataFrame:
    """One row per (variant = setting, value) of a tuning family: runs, failures, mean and sd of ``metric``."""
    name, split = TUNE_METRICS[metric]
    family_runs = runs[runs["family"] == tuning_family]
    scores = select_values(metrics, name, split, "final")
    scores = scores[scores["family"] == tuning_family].merge(
        family_runs[["run_id", "tune_value"]], on="run_id", how="left")
    rows = []
    for (setting, value), group in family_runs.groupby(["setting", "tune_value"], sort=False):
        values = scores.loc[(scores["setting"] == setting) & (scores["tune_value"] == value), "value"]
        rows.append({"setting": setting, "value": float(value), "extension": bool(flags(group, "tune_extension").any()),
                     "n_runs": len(group),
                     "n_failed": int((group["status"] != "ok").sum()),
                     "mean": float(values.mean()) if len(values) else math.nan,
                     "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan})
    return pd.DataFrame(rows, columns=["setting", "value", "extension", "n_runs", "n_failed", "mean", "std"])


def select_tuned(scores: pd.DataFrame) -> dict[str, float]:
    """Variant -> the value with the best mean score; ties to the smaller value; None if no value finished."""
    chosen = {}
    for setting, group in scores.groupby("setting", sort=False):
        finished = group[group["mean"].notna()]
        if finished.empty:
            chosen[setting] = None
            continue
        best = finished["mean"].max()
        chosen[setting] = float(finished.loc[finished["mean"] == best, "value"].min())
    return chosen


def chosen_edges(scores: pd.DataFrame, chosen: dict) -> dict[str, str]:
    """Variant -> "low" / "high" when its chosen value is the smallest / largest of its grid and scored better
    than its neighbour (the curve still rises towards that end), else "". A tie with the neighbour is not an
    edge: the smaller of tied values is chosen by rule, and a flat curve says nothing about what lies beyond."""
    edges = {}
    for setting, group in scores.groupby("setting", sort=False):
        curve = group.dropna(subset=["mean"]).sort_values("value")
        value, edge = chosen.get(setting), ""
        if value is not None and len(curve) >= 2:
            for end, at, neighbour in (("low", 0, 1), ("high", -1, -2)):
                if curve["value"].iloc[at] == value and curve["mean"].iloc[at] > curve["mean"].iloc[neighbour]:
                    edge = end
        edges[setting] = edge
    return edges


def selection(runs: pd.DataFrame, metrics: pd.DataFrame, family: str, tune: dict) -> dict:
    """The JSON the workflow derives a tuned family's runs from: chosen value per variant, scores, budget."""
    tuning_family = f"{family}_tune"
    scores = tuning_scores(runs, metrics, tuning_family, tune["metric"])
    chosen = select_tuned(scores)
    missing = sorted(v for v, value in chosen.items() if value is None)
    if missing:
        raise ValueError(f"tuning of family {family!r}: no tuning run of variant(s) {missing} finished, so no "
                         f"value of {tune['key']} can be chosen; see the failed runs of family {tuning_family!r}")
    return {
        "family": family, "tuning_family": tuning_family, "key": tune["key"], "grids": tune.get("grids") or {},
        "seeds": list(tune["seeds"]), "metric": tune["metric"],
        "rule": "highest mean validation score over the tuning seeds; ties to the smaller value",
        "chosen": chosen, "chosen_edge": chosen_edges(scores, chosen),
        "scores": {s: {str(r.value): r.mean for r in g.itertuples()} for s, g in scores.groupby("setting", sort=False)},
    }


def tuning_table(runs: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Every tuning family's scores per (variant, value), with the chosen value marked and the budget per run
    (epochs and step cap, equal for every variant by construction)."""
    parts = []
    tuning = runs[runs["family_kind"] == TUNE_KIND] if "family_kind" in runs else runs.iloc[0:0]
    for tuning_family in family_order(tuning):
        family_runs = tuning[tuning["family"] == tuning_family]
        first = family_runs.iloc[0]
        metric = str(first.get("tune_metric") or "validation_accuracy")
        scores = tuning_scores(runs, metrics, tuning_family, metric)
        chosen = select_tuned(scores)
        scores["chosen"] = [chosen.get(r.setting) == r.value for r in scores.itertuples()]
        scores["chosen_edge"] = scores["setting"].map(chosen_edges(scores, chosen))
        scores["family"], scores["tuning_family"] = first.get("tunes", ""), tuning_family
        scores["key"], scores["metric"] = first.get("tune_key", ""), metric
        scores["optimizer_steps"] = _single(family_runs, cfg("train.max_steps"))
        scores["epochs"] = _single(family_runs, cfg("train.epochs"))
        parts.append(scores)
    if not parts:
        return pd.DataFrame(columns=TUNING_COLUMNS)
    return pd.concat(parts, ignore_index=True).reindex(columns=TUNING_COLUMNS)


def _single(frame: pd.DataFrame, column: str):
    """The column's one value across ``frame`` (None when absent or when runs differ)."""
    values = frame[column].dropna().unique() if column in frame else []
    return values[0] if len(values) == 1 else None


def write_tuning_table(runs_path: str | Path, metrics_path: str | Path, out_dir: str | Path) -> Path:
    """``tuning.parquet`` (+ CSV): empty with its columns when the study tunes nothing."""
    table = tuning_table(pd.read_parquet(runs_path), pd.read_parquet(metrics_path))
    return write_named_tables({"tuning": table}, out_dir)["tuning"]

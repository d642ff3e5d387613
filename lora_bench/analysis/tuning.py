"""Tuning with an equal budget: one key (e.g. the learning rate) chosen per variant before a comparison.

A method compared at one hand-picked learning rate may only be further from its own best rate. A family with a
``tune`` block (see study.schema.yaml) therefore first runs every variant at every value of the same grid, on
the same tuning seeds, with the same epochs and steps, scored on the **validation split only** (tuning runs do
not evaluate the test split at all), and then compares the variants on its own seeds, each at its chosen value.

``select_tuned`` picks, per variant, the value with the highest mean validation score over the tuning seeds.
Accuracy on a few hundred (or, for an LLM, a few dozen) validation answers ties often. A tie on one tuning seed
is a sign that the seed cannot tell the values apart, so with ``tune.tie_seeds`` the tied values (and only
those) run again on fresh seeds, and the best mean over the tuning and tie seeds together wins. A tie that
remains (or any tie without tie seeds) is broken by ``tune.tie_break`` (``TIE_BREAKS``): ``trained`` (the
default) takes the value whose tuning runs trained (learned, neither collapsed nor diverged, and levelled off:
``lora_bench.run.diagnostics``), then the smaller value, the gentler rate; ``smaller`` the smaller value alone;
``loss`` the lower mean validation loss at the selected epochs, a continuous score of the same runs. ``trained``
differs from ``smaller`` only where the smaller value's runs had not trained and the larger's had: under a fixed
step budget a gentler rate that is still improving would run the family's seeds at a rate that does not converge
in that budget, and their comparisons would be inconclusive. Measured here (README "Ties"), the lower loss of one
seed picked the rate that did worse over the seeds all 3 times (by 1.2, 10 and 0.7 points), so it is an option,
not the default. ``tune.tie_margin`` widens what counts as a tie: values whose mean is within the margin of the best
(e.g. 0.0025, one answer of 400) tie with it, so a near tie, which one tuning seed decides no better than an exact
one, also goes to the tie seeds (or the tie-break). The table marks every tied value and the report names the rule
beside every comparison it decided. Failed tuning runs count as missing; a value none
of whose runs finished cannot be chosen. The workflow's ``select_tune`` checkpoint writes the
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
from dataclasses import dataclass
from pathlib import Path

import pandas as pd

from lora_bench.analysis.columns import cfg
from lora_bench.analysis.summary import family_order, select_values
from lora_bench.atomic import write_named_tables
from lora_bench.study import TUNE_KIND

# The tune block's metric -> (metric, split) of the tidy metrics table.
TUNE_METRICS = {"validation_accuracy": ("accuracy", "validation"), "validation_macro_f1": ("macro_f1", "validation")}
TUNING_COLUMNS = ["family", "tuning_family", "setting", "key", "value", "extension", "metric", "n_runs", "n_failed",
                  "mean", "std", "loss", "trained", "tied", "n_tie_runs", "tie_mean", "chosen", "chosen_edge",
                  "tie_break", "tie_margin", "optimizer_steps", "epochs"]
SCORE_COLUMNS = ["setting", "value", "extension", "n_runs", "n_failed", "mean", "std", "loss", "trained",
                 "n_tie_runs", "tie_mean"]


@dataclass(frozen=True)
class TieBreak:
    """How values with the same best mean score are ordered: ``column`` of the scores (ascending, or descending
    where ``ascending`` is False; NaN last), then the smaller value; ``column`` None: the smaller value only."""

    description: str
    column: str | None
    ascending: bool = True
    # Where ``column`` does not separate the tied values (equal, or unknown for all), the smaller value decides;
    # the report then says so, with this reason.
    alike: str = ""


TIE_BREAKS = {
    "trained": TieBreak("the value whose tuning runs trained (learned and levelled off), then the smaller value",
                        "trained", ascending=False, alike="their tuning runs trained alike"),
    "loss": TieBreak("the lower mean validation loss at the selected epochs", "loss", alike="equal validation losses"),
    "smaller": TieBreak("the smaller value", None),
}
DEFAULT_TIE_BREAK = "trained"
# Records made before tune.tie_break existed carry no tune_tie_break label; they were selected by this rule.
LEGACY_TIE_BREAK = "smaller"


def tie_break_spec(name: str) -> TieBreak:
    """The registered tie-break ``name``; a clear error naming the known ones otherwise."""
    if name not in TIE_BREAKS:
        raise ValueError(f"unknown tune.tie_break {name!r}; known: {sorted(TIE_BREAKS)}")
    return TIE_BREAKS[name]


def decided_by(rule: TieBreak, column_values: list) -> str:
    """What broke a tie under ``rule``, given its column's value for each tied value: the rule, or the smaller
    value where the column does not separate them (all equal, or all unknown)."""
    if not rule.column:
        return rule.description
    known = [v for v in column_values if v is not None and not (isinstance(v, float) and math.isnan(v))]
    if known and len(known) < len(column_values):
        return rule.description
    if not known or all(math.isclose(v, known[0]) for v in known):
        return f"the smaller value ({rule.alike or 'the rule did not separate them'})"
    return rule.description


def tie_break_of(label) -> str:
    """The tie-break a record label or table cell names; the legacy rule where it is missing, empty or NaN."""
    return label if isinstance(label, str) and label else LEGACY_TIE_BREAK


def tie_margin_of(label) -> float:
    """The tie margin a record label or table cell names: 0 (exact ties only) where it is missing or NaN, as in
    records made before ``tune.tie_margin`` and in studies that do not set it."""
    try:
        margin = float(label)
    except (TypeError, ValueError):
        return 0.0
    return margin if math.isfinite(margin) else 0.0


def tie_rules(family_runs: pd.DataFrame, tune: dict | None = None) -> tuple[str, float]:
    """(tie_break, tie_margin) of a tuning family: as ``tune`` gives them (``select-tune --study``), else as its
    runs are labelled (``tune_tie_break``, ``tune_tie_margin``), the way the workflow's selection and the tuning
    table both read them: the labels are what a change of the rule re-makes, so the selection, the table and the
    report can never disagree on the rule."""
    tune = tune or {}
    first = family_runs.iloc[0] if len(family_runs) else pd.Series(dtype=object)
    tie_break = tune.get("tie_break") or tie_break_of(first.get("tune_tie_break"))
    margin = tie_margin_of(tune["tie_margin"] if "tie_margin" in tune else first.get("tune_tie_margin"))
    return tie_break, margin


def tied_with(table: pd.DataFrame, setting: str, value: float) -> list[float]:
    """The other values of ``setting`` that tuning.parquet flags as tied with ``value`` at the top."""
    others = table[(table["setting"] == setting) & flags(table, "tied") & (table["value"] != value)]
    return sorted(float(v) for v in others["value"])


def same_score(a: float, b: float, margin: float = 0.0) -> bool:
    """Equal mean scores (over the tuning seeds, or the tuning and tie seeds): means over the same number of
    seeds of per-answer fractions may differ only by the order of a float sum. With ``margin`` (tune.tie_margin),
    scores at most that far apart count as equal too."""
    return abs(a - b) <= margin + 1e-12 or math.isclose(a, b, rel_tol=1e-9, abs_tol=1e-12)


def flags(frame: pd.DataFrame, column: str) -> pd.Series:
    """``column`` of ``frame`` as booleans, False where missing and where the column is absent: records and
    tables made before ``tune.extend`` have no ``tune_extension`` / ``extension`` column, and every value of
    theirs is of a base grid."""
    if column not in frame:
        return pd.Series(False, index=frame.index)
    return frame[column].fillna(False).astype(bool)


def tuning_scores(runs: pd.DataFrame, metrics: pd.DataFrame, tuning_family: str, metric: str) -> pd.DataFrame:
    """One row per (variant = setting, value) of a tuning family: runs, failures, mean and sd of ``metric``, and
    the mean validation loss at the epochs that score comes from (NaN where the runs logged none), all over the
    tuning seeds, so every value of a variant is compared on the same seeds; and, for a value that also ran on
    the tie seeds (``tune.tie_seeds``), those runs' count and the mean over the tuning and tie seeds together
    (``tie_mean``: NaN unless every one of its tie runs was scored)."""
    name, split = TUNE_METRICS[metric]
    family_runs = runs[runs["family"] == tuning_family]
    family_runs = family_runs.assign(_tie_seed=flags(family_runs, "tune_tie_seed"))
    scores = select_values(metrics, name, split, "final")
    scores = scores[scores["family"] == tuning_family].merge(
        family_runs[["run_id", "tune_value", "_tie_seed"]], on="run_id", how="left")
    scores = scores.assign(loss=_selected_epoch_loss(metrics, scores))
    rows = []
    for (setting, value), group in family_runs.groupby(["setting", "tune_value"], sort=False):
        scored = scores[(scores["setting"] == setting) & (scores["tune_value"] == value)]
        base, on_tuning_seeds = group[~group["_tie_seed"]], scored[~flags(scored, "_tie_seed")]
        values, losses = on_tuning_seeds["value"], on_tuning_seeds["loss"]
        n_tie = int(group["_tie_seed"].sum())
        every_tie_run_scored = n_tie > 0 and len(scored) - len(on_tuning_seeds) == n_tie
        rows.append({"setting": setting, "value": float(value), "extension": bool(flags(group, "tune_extension").any()),
                     "n_runs": len(base),
                     "n_failed": int((base["status"] != "ok").sum()),
                     "mean": float(values.mean()) if len(values) else math.nan,
                     "std": float(values.std(ddof=1)) if len(values) > 1 else math.nan,
                     # Only where every scored run has one: a mean over fewer runs would not compare like for like.
                     "loss": float(losses.mean()) if len(losses) and losses.notna().all() else math.nan,
                     "trained": _fraction_trained(group),
                     "n_tie_runs": n_tie,
                     "tie_mean": float(scored["value"].mean()) if every_tie_run_scored else math.nan})
    return pd.DataFrame(rows, columns=SCORE_COLUMNS)


def _fraction_trained(runs: pd.DataFrame) -> float:
    """The fraction of the finished ``runs`` (tuning and tie seeds) whose learning diagnostics say they trained;
    NaN where one has no diagnostics (records made before them) or none finished, so that no value wins or
    loses a tie on a flag it does not have."""
    finished = runs[runs["status"] == "ok"]
    if "trained" not in finished or finished.empty or finished["trained"].isna().any():
        return math.nan
    return float(finished["trained"].astype(bool).mean())


def _selected_epoch_loss(metrics: pd.DataFrame, scores: pd.DataFrame) -> pd.Series:
    """Per score row, the run's validation loss at the epoch the score was taken from (its ``epoch``): a causal LM
    records it in its final block, a classifier in its per-epoch rows."""
    losses = metrics[(metrics["metric"] == "loss") & (metrics["split"] == "validation")
                     & metrics["stage"].isin(["final", "epoch"])]
    losses = losses.drop_duplicates(["run_id", "epoch"])[["run_id", "epoch", "value"]]
    merged = scores[["run_id", "epoch"]].merge(losses.rename(columns={"value": "loss"}), on=["run_id", "epoch"],
                                               how="left")
    return pd.Series(merged["loss"].to_numpy(dtype=float), index=scores.index)


def _top(group: pd.DataFrame, column: str = "mean", margin: float = 0.0) -> pd.DataFrame:
    """The rows of one variant whose ``column`` ties the best finished one, within ``margin`` (empty if none
    finished)."""
    finished = group[group[column].notna()]
    if finished.empty:
        return finished
    best = finished[column].max()
    return finished[[same_score(score, best, margin) for score in finished[column]]]


def _decided_on_tie_seeds(tied: pd.DataFrame) -> pd.DataFrame:
    """Of the values tied on the tuning seeds, those with the best mean over the tuning and tie seeds; all of
    them where none ran on the tie seeds (a value whose tie runs failed cannot win over one that has them). No
    margin here: the tie seeds are there to decide, so only an exact tie of their means goes to the tie-break."""
    if "tie_mean" not in tied or tied["tie_mean"].isna().all():
        return tied
    return _top(tied, "tie_mean")


def tied_values(scores: pd.DataFrame, margin: float = 0.0) -> dict[str, list[float]]:
    """Variant -> the values (ascending) whose mean score ties the best (within ``margin``); one value where
    nothing ties."""
    return {setting: sorted(float(v) for v in _top(group, margin=margin)["value"])
            for setting, group in scores.groupby("setting", sort=False)}


def select_tuned(scores: pd.DataFrame, tie_break: str = DEFAULT_TIE_BREAK, margin: float = 0.0) -> dict[str, float]:
    """Variant -> the value with the best mean score on the tuning seeds; among tied values (within ``margin``
    of the best), the best mean over the tuning and tie seeds where they ran on tie seeds, and a tie that
    remains broken by ``tie_break``; None if no value finished."""
    rule = tie_break_spec(tie_break)
    chosen = {}
    for setting, group in scores.groupby("setting", sort=False):
        tied = _decided_on_tie_seeds(_top(group, margin=margin))
        if tied.empty:
            chosen[setting] = None
            continue
        by_rule = bool(rule.column) and rule.column in tied
        order, ascending = ([rule.column, "value"], [rule.ascending, True]) if by_rule else (["value"], [True])
        chosen[setting] = float(tied.sort_values(order, ascending=ascending, na_position="last")["value"].iloc[0])
    return chosen


def chosen_edges(scores: pd.DataFrame, chosen: dict, margin: float = 0.0) -> dict[str, str]:
    """Variant -> "low" / "high" when its chosen value is the smallest / largest of its grid and scored better
    than its neighbour (the curve still rises towards that end), else "". A tie with the neighbour (within
    ``margin``) is not an edge, whichever way the tie-break went: a flat top says nothing about what lies beyond
    it (and extending every flat chance-level curve would spend runs on variants that learn at no rate tried)."""
    edges = {}
    for setting, group in scores.groupby("setting", sort=False):
        curve = group.dropna(subset=["mean"]).sort_values("value")
        value, edge = chosen.get(setting), ""
        if value is not None and len(curve) >= 2:
            for end, at, neighbour in (("low", 0, 1), ("high", -1, -2)):
                score, beside = curve["mean"].iloc[at], curve["mean"].iloc[neighbour]
                if curve["value"].iloc[at] == value and score > beside and not same_score(score, beside, margin):
                    edge = end
        edges[setting] = edge
    return edges


def selection(runs: pd.DataFrame, metrics: pd.DataFrame, family: str, tune: dict) -> dict:
    """The JSON the workflow derives a tuned family's runs from: chosen value per variant, scores, budget."""
    tuning_family = f"{family}_tune"
    scores = tuning_scores(runs, metrics, tuning_family, tune["metric"])
    tie_break, margin = tie_rules(runs[runs["family"] == tuning_family], tune)
    chosen = select_tuned(scores, tie_break, margin)
    missing = sorted(v for v, value in chosen.items() if value is None)
    if missing:
        raise ValueError(f"tuning of family {family!r}: no tuning run of variant(s) {missing} finished, so no "
                         f"value of {tune['key']} can be chosen; see the failed runs of family {tuning_family!r}")
    tie_seeds = list(tune.get("tie_seeds") or [])
    on_tie_seeds = f"the best mean over the tuning and tie seeds {tie_seeds}, then " if tie_seeds else ""
    tied = {s: values for s, values in tied_values(scores, margin).items() if len(values) > 1}
    within = f" (within {margin:g} of the best)" if margin else ""
    return {
        "family": family, "tuning_family": tuning_family, "key": tune["key"], "grids": tune.get("grids") or {},
        "seeds": list(tune["seeds"]), "metric": tune["metric"],
        "rule": f"highest mean validation score over the tuning seeds; ties{within} to {on_tie_seeds}"
                f"{tie_break_spec(tie_break).description}",
        "tie_break": tie_break, "tie_seeds": tie_seeds, "tie_margin": margin, "chosen": chosen,
        "chosen_edge": chosen_edges(scores, chosen, margin),
        "tied": tied,
        # Per tied variant, each tied value's mean over the tuning and tie seeds (None: not run on them yet).
        "tie_means": {s: {str(r.value): None if math.isnan(r.tie_mean) else r.tie_mean
                          for r in scores[scores["setting"] == s].itertuples() if r.value in values}
                      for s, values in tied.items()},
        "scores": {s: {str(r.value): r.mean for r in g.itertuples()} for s, g in scores.groupby("setting", sort=False)},
        "losses": _per_value(scores, "loss"),
        # Per value, the fraction of its finished tuning (and tie-seed) runs that trained (None: not known).
        "trained": _per_value(scores, "trained"),
    }


def _per_value(scores: pd.DataFrame, column: str) -> dict[str, dict[str, float | None]]:
    """Variant -> value -> ``column`` of the scores, None where NaN (JSON has no NaN)."""
    return {setting: {str(value): None if math.isnan(x) else x for value, x in zip(group["value"], group[column])}
            for setting, group in scores.groupby("setting", sort=False)}


def tuning_table(runs: pd.DataFrame, metrics: pd.DataFrame) -> pd.DataFrame:
    """Every tuning family's scores per (variant, value), with the chosen value marked and the budget per run
    (epochs and step cap, equal for every variant by construction)."""
    parts = []
    tuning = runs[runs["family_kind"] == TUNE_KIND] if "family_kind" in runs else runs.iloc[0:0]
    for tuning_family in family_order(tuning):
        family_runs = tuning[tuning["family"] == tuning_family]
        first = family_runs.iloc[0]
        metric = str(first.get("tune_metric") or "validation_accuracy")
        tie_break, margin = tie_rules(family_runs)
        scores = tuning_scores(runs, metrics, tuning_family, metric)
        chosen = select_tuned(scores, tie_break, margin)
        tied = tied_values(scores, margin)
        scores["tied"] = [len(tied[r.setting]) > 1 and r.value in tied[r.setting] for r in scores.itertuples()]
        scores["chosen"] = [chosen.get(r.setting) == r.value for r in scores.itertuples()]
        scores["chosen_edge"] = scores["setting"].map(chosen_edges(scores, chosen, margin))
        scores["tie_break"], scores["tie_margin"] = tie_break, margin
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

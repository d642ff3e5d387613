"""Summaries of the tidy result tables: rows of finished runs, and each condition's mean with its interval.

Everything in ``lora_bench.analysis`` is tables in, tables out (see ``docs/tables.md`` for ``runs`` and
``metrics``), so the figures and the report can be rebuilt from files alone and the numbers can be checked by
hand. This module holds what the others share: the selection of rows, the constants of every interval and test
(``CONFIDENCE``, ``ALPHA``, the seeded bootstrap) and the numerical failures they catch.

- **Only ``status == "ok"`` runs count.** Failed runs may have left a few per-epoch rows behind; they
  are dropped, and the tests table says when a condition lost runs.
- **Summaries** (``summarize``): per (family, variant) the mean, standard deviation, standard error,
  min, max and a 95 % confidence interval of the mean. The interval is a BCa bootstrap
  (``scipy.stats.bootstrap``, seeded, so reruns give identical tables) when there are at least three
  runs, a t interval with two runs (a bootstrap of two values has three possible means), and none
  with fewer; ``ci_method`` says which. With 3-5 seeds a bootstrap interval is somewhat too narrow,
  so the t interval is always given too (``t_ci_low`` / ``t_ci_high``). For metrics bounded to [0, 1] (unit
  ``fraction``: accuracy, macro-F1) every t interval is taken on the logit scale and transformed back
  (``ci_method`` then ends in ", logit scale"), so it stays inside [0, 1]; a bootstrap interval of a mean of
  fractions already does. Where a run kept its predictions, ``analysis.items`` gives the crossed items x seeds
  interval of the accuracy too (``item_summary``), which the report prefers.
- **Numerical failures** (``NUMERICAL_ERRORS``: a singular matrix, a root finder without a sign change, an
  overflow) are caught at the one computation that raises them: that number is NaN and the row's ``note``
  (``ci_method`` in the summary) names the failure; the rest of the row and of the tables are written.

``prediction_interval`` gives the range of one further run, the fair yardstick for a published single run.
``detectable_difference`` gives the smallest difference a test of this standard error and df would find with
power 0.8: what a "no significant difference" rules out.
"""

from __future__ import annotations

import math
import warnings

import numpy as np
import pandas as pd
from scipy import optimize, special, stats

CONFIDENCE = 0.95
ALPHA = 0.05
# The power at which a design's smallest detectable difference is stated (and seeds needed are planned).
TARGET_POWER = 0.8
BOOTSTRAP_RESAMPLES = 4999
# A fixed seed makes the bootstrap intervals, and so the committed tables, reproducible.
BOOTSTRAP_SEED = 20240607
# The numerical failures a computation on degenerate data can raise (a singular matrix, a root finder
# without a sign change, an overflow). Each is caught at the one computation that raises it and becomes NaN
# with a note on that row; anything else is a bug and propagates.
NUMERICAL_ERRORS = (np.linalg.LinAlgError, ValueError, FloatingPointError, ZeroDivisionError, OverflowError)


# Gauss-Legendre nodes for the power integral of ``detectable_difference`` (256: exact to 1e-9 for any df).
_POWER_NODES, _POWER_WEIGHTS = np.polynomial.legendre.leggauss(256)


def detectable_difference(se: float, df: float, alpha: float = ALPHA, power: float = TARGET_POWER) -> float:
    """Smallest true difference a two-sided t test (level ``alpha``, before any multiplicity correction) with
    this standard error and degrees of freedom detects with probability ``power``; NaN when undefined.

    Exact under the t model (the noncentral t, not the normal shortcut, which with 2 degrees of freedom
    understates it by half). A "no significant difference" then reads: differences this large would probably
    have been found; smaller ones may exist. It uses the observed standard error, so it is itself an estimate.
    The power is integrated over the spread's chi distribution by quadrature rather than taken from
    ``scipy.stats.nct``, which returns NaN for 1 degree of freedom (two seeds).
    """
    if not (np.isfinite(se) and se > 0 and np.isfinite(df) and df > 0):
        return math.nan
    critical = float(stats.t.ppf(1 - alpha / 2, df))
    # T = (Z + noncentrality) / S with S = sqrt(chi2_df / df); integrate over S, whose mass lies in [low, high].
    low, high = stats.chi.ppf([1e-12, 1 - 1e-12], df) / math.sqrt(df)
    spread = low + (high - low) * (_POWER_NODES + 1) / 2
    weights = _POWER_WEIGHTS * (high - low) / 2 * stats.chi.pdf(spread * math.sqrt(df), df) * math.sqrt(df)

    def shortfall(noncentrality: float) -> float:
        rejects = special.ndtr(noncentrality - critical * spread) + special.ndtr(-noncentrality - critical * spread)
        return float(weights @ rejects) - power

    try:
        upper = critical + 4.0  # power rises with the noncentrality: widen until it brackets the target
        while shortfall(upper) < 0:
            upper *= 2
        return float(optimize.brentq(shortfall, 0.0, upper, xtol=1e-10) * se)
    except (*NUMERICAL_ERRORS, RuntimeError):  # RuntimeError: brentq did not converge
        return math.nan


# ----------------------------------------------------------------------------------------------------
# Selecting rows


def family_order(frame: pd.DataFrame) -> list[str]:
    """Families in order of first appearance, the order the config lists them in."""
    return list(dict.fromkeys(frame["family"].tolist()))


def ok_rows(metrics: pd.DataFrame) -> pd.DataFrame:
    if "status" not in metrics.columns:
        return metrics
    return metrics[metrics["status"] == "ok"]


def select_values(
    metrics: pd.DataFrame, metric: str = "accuracy", split: str = "test", stage: str = "final"
) -> pd.DataFrame:
    """Rows of ok runs for one metric, split and stage."""
    ok = ok_rows(metrics)
    return ok[(ok["metric"] == metric) & (ok["split"] == split) & (ok["stage"] == stage)]


def present(metrics: pd.DataFrame, metric: str, split: str, stage: str) -> bool:
    return bool(
        ((metrics["metric"] == metric) & (metrics["split"] == split) & (metrics["stage"] == stage)).any()
    )


def metric_meta(rows: pd.DataFrame) -> tuple[str, bool]:
    unit = str(rows["unit"].iloc[0]) if "unit" in rows.columns and len(rows) else ""
    higher = (
        bool(rows["higher_is_better"].iloc[0]) if "higher_is_better" in rows.columns and len(rows) else True
    )
    return unit, higher


def by_seed(rows: pd.DataFrame) -> pd.Series:
    """Values indexed by seed; a duplicated seed (should not happen) keeps its mean."""
    return rows.groupby("seed")["value"].mean().astype(float)


# ----------------------------------------------------------------------------------------------------
# Summaries


def _mean_interval(values: np.ndarray) -> tuple[float, float, str, float, float]:
    """(ci_low, ci_high, ci_method, t_low, t_high) for the mean of ``values``."""
    n = len(values)
    if n < 2:
        return math.nan, math.nan, "none (n < 2)", math.nan, math.nan
    mean = float(np.mean(values))
    sem = float(stats.sem(values))
    if sem == 0.0:
        return mean, mean, "constant", mean, mean
    t_low, t_high = stats.t.interval(CONFIDENCE, n - 1, loc=mean, scale=sem)
    if n == 2:
        return float(t_low), float(t_high), "t (n = 2)", float(t_low), float(t_high)
    low, high, method = math.nan, math.nan, "bootstrap BCa"
    with warnings.catch_warnings():
        # BCa warns (and returns NaN) on degenerate resamples; we then fall back to percentile.
        warnings.simplefilter("ignore")
        for method_name, label in (("BCa", "bootstrap BCa"), ("percentile", "bootstrap percentile")):
            try:
                result = stats.bootstrap(
                    (values,),
                    np.mean,
                    confidence_level=CONFIDENCE,
                    n_resamples=BOOTSTRAP_RESAMPLES,
                    method=method_name,
                    rng=np.random.default_rng(BOOTSTRAP_SEED),
                )
            except NUMERICAL_ERRORS:
                continue
            low, high = float(result.confidence_interval.low), float(result.confidence_interval.high)
            method = label
            if np.isfinite(low) and np.isfinite(high):
                break
    if not (np.isfinite(low) and np.isfinite(high)):
        # Both bootstraps failed numerically: the t interval is still a sound interval of the mean.
        return float(t_low), float(t_high), "t (bootstrap failed)", float(t_low), float(t_high)
    return low, high, method, float(t_low), float(t_high)


# Units of metrics bounded to [0, 1] (accuracy, macro-F1): their t intervals are taken on the logit scale.
BOUNDED_UNITS = ("fraction",)


def _logit_t_interval(values: np.ndarray) -> tuple[float, float] | None:
    """95 % t interval of the mean on the logit scale (delta method), transformed back: inside (0, 1).

    A t interval of a fraction from two or three seeds can leave [0, 1] (38.6-133.9 % for a mean of 86.3 %);
    on the logit scale the same evidence gives an interval that respects the scale, asymmetric near the
    bounds. None when a value is 0 or 1 (no logit) or all values are equal.
    """
    n, mean = len(values), float(np.mean(values))
    if n < 2 or not (0 < mean < 1) or float(np.std(values)) == 0.0:
        return None
    half = float(stats.t.ppf(0.5 + CONFIDENCE / 2, n - 1)) * float(stats.sem(values)) / (mean * (1 - mean))
    centre = math.log(mean / (1 - mean))
    return 1 / (1 + math.exp(-(centre - half))), 1 / (1 + math.exp(-(centre + half)))


def _describe(values: np.ndarray, unit: str = "") -> dict:
    n = len(values)
    ci_low, ci_high, ci_method, t_low, t_high = _mean_interval(values)
    bounded = _logit_t_interval(values) if unit in BOUNDED_UNITS else None
    if bounded is not None:
        t_low, t_high = bounded
        if ci_method.startswith("t"):
            ci_low, ci_high, ci_method = t_low, t_high, f"{ci_method}, logit scale"
    return {
        "n": n,
        "mean": float(np.mean(values)) if n else math.nan,
        "std": float(np.std(values, ddof=1)) if n > 1 else math.nan,
        "sem": float(stats.sem(values)) if n > 1 else math.nan,
        "ci_low": ci_low,
        "ci_high": ci_high,
        "ci_method": ci_method,
        "t_ci_low": t_low,
        "t_ci_high": t_high,
        "min": float(np.min(values)) if n else math.nan,
        "max": float(np.max(values)) if n else math.nan,
    }


def _summary_rows(rows: pd.DataFrame, keys: list[str], metric: str, split: str, stage: str) -> list[dict]:
    unit, higher = metric_meta(rows)
    out = []
    for key, group in rows.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        values = by_seed(group)
        record = dict(zip(keys, key, strict=True))
        record.update(
            {
                "family_kind": str(group["family_kind"].iloc[0]),
                "is_baseline": bool(group["is_baseline"].iloc[0]) if "is_baseline" in group else False,
                "metric": metric,
                "split": split,
                "stage": stage,
                "unit": unit,
                "higher_is_better": higher,
            }
        )
        record.update(_describe(values.to_numpy(), unit))
        record["seeds"] = ",".join(str(int(s)) for s in values.index)
        out.append(record)
    return out


SUMMARY_COLUMNS = [
    "family", "family_kind", "variant", "is_baseline", "metric", "split", "stage", "epoch", "unit",
    "higher_is_better", "n", "mean", "std", "sem", "ci_low", "ci_high", "ci_method", "t_ci_low", "t_ci_high",
    "min", "max", "seeds",
]  # fmt: skip


def order_like_input(frame: pd.DataFrame, source: pd.DataFrame) -> pd.DataFrame:
    """Sort families and variants by first appearance in ``source`` rather than alphabetically."""
    if frame.empty:
        return frame
    family_rank = {f: i for i, f in enumerate(family_order(source))}
    variant_rank = {
        v: i for i, v in enumerate(dict.fromkeys(zip(source["family"], source["variant"], strict=True)))
    }
    order = frame.apply(
        lambda r: (family_rank.get(r["family"], 1e9), variant_rank.get((r["family"], r["variant"]), 1e9)),
        axis=1,
    )
    frame = frame.assign(_order=order).sort_values("_order", kind="stable").drop(columns="_order")
    return frame.reset_index(drop=True)


def summarize(
    metrics: pd.DataFrame, metric: str = "accuracy", split: str = "test", stage: str = "final"
) -> pd.DataFrame:
    """Per (family, variant) over ok runs: n, mean, std, sem, 95 % CI (with ``ci_method``), min, max."""
    rows = select_values(metrics, metric, split, stage)
    summary = pd.DataFrame(_summary_rows(rows, ["family", "variant"], metric, split, stage))
    summary = summary.reindex(columns=SUMMARY_COLUMNS)
    summary["epoch"] = pd.array([pd.NA] * len(summary), dtype="Int64")
    return order_like_input(summary, metrics)


def summarize_epochs(metrics: pd.DataFrame, metric: str = "accuracy", split: str = "test") -> pd.DataFrame:
    """Per (family, variant, epoch) over ok runs, from the ``stage == "epoch"`` rows."""
    rows = select_values(metrics, metric, split, "epoch")
    summary = pd.DataFrame(_summary_rows(rows, ["family", "variant", "epoch"], metric, split, "epoch"))
    summary = summary.reindex(columns=SUMMARY_COLUMNS)
    if summary.empty:
        return summary
    summary["epoch"] = summary["epoch"].astype("Int64")
    summary = order_like_input(summary, metrics)
    return summary.sort_values(
        ["family", "variant", "epoch"], key=_stable_key(summary), kind="stable"
    ).reset_index(drop=True)


def _stable_key(frame: pd.DataFrame):
    """Sort key that keeps first-appearance order of families/variants and numeric order of epochs."""

    def key(column: pd.Series) -> pd.Series:
        if column.name == "epoch":
            return column
        return column.map({v: i for i, v in enumerate(dict.fromkeys(column.tolist()))})

    return key


# ----------------------------------------------------------------------------------------------------
# Published numbers


def prediction_interval(mean: float, std: float, n: int) -> tuple[float, float]:
    """95 % interval for one further run, given n runs with this mean and standard deviation.

    This, not the interval of the mean, is the fair yardstick for a published single run: one run
    scatters by the full seed-to-seed spread, not by the standard error.
    """
    if n < 2 or not np.isfinite(std):
        return math.nan, math.nan
    half_width = stats.t.ppf(1 - (1 - CONFIDENCE) / 2, n - 1) * std * math.sqrt(1 + 1 / n)
    return mean - half_width, mean + half_width

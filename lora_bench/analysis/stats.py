"""Statistics over the tidy result tables: summaries with confidence intervals and tests against baselines.

Everything here is tables in, tables out (see ``docs/tables.md`` for ``runs`` and ``metrics``), so the
figures and the report can be rebuilt from files alone and the numbers can be checked by hand. The
reference write-ups this suite reproduces report single runs; the point of this module is to say how
much of a difference between two settings survives seed-to-seed noise.

Choices, and why:

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
- **Tests** (``compare_to_baseline``): each non-baseline variant of a family against the family's
  baseline (``is_baseline`` in ``runs``). Runs that share a seed share data order and initialisation,
  so when both conditions have at least two seeds in common the comparison is *paired* on seed (only
  the common seeds are used): paired t test, with the Wilcoxon signed-rank test as the
  distribution-free check. Otherwise Welch's t test (no equal-variance assumption) and the
  Mann-Whitney U test. Holm's step-down correction is applied within each family (per metric and
  split), separately to the t tests and to the rank tests: a family is one question ("which of these
  variants differ from the baseline?"), and Holm controls the chance of any false claim in it.
  For families of kind ``epochs`` every epoch of a variant is compared with epoch 1 of the same
  variant (paired on seed, ``stage == "epoch"``).
- **Effect sizes**: Cohen's d (pooled standard deviation) for unpaired comparisons and d_z (mean
  difference over the standard deviation of the differences) for paired ones. Their 95 % intervals
  invert the noncentral t distribution (Steiger & Fouladi), which is exact for normal data and
  behaves far better than a bootstrap with five seeds.
- **Ratios** (``ratio``): every comparison also gives mean_variant / mean_baseline, the natural scale for
  costs ("QLoRA uses 0.6x the memory of LoRA"). Its 95 % interval is **Fieller's**: the set of ratios
  rho for which the t test of ``variant - rho * baseline`` does not reject at 5 %. Paired, that is the
  paired t test of ``v_i - rho * b_i`` (exact for normal data, and it uses the seed-to-seed correlation
  the way the paired difference test does); unpaired, Welch's test with the Welch-Satterthwaite degrees
  of freedom taken at the estimated ratio (approximate). Unlike the delta method it is not forced to be
  symmetric, and unlike a bootstrap it works with three seeds. When the baseline mean is not clearly
  nonzero the set is unbounded and the interval is NaN, with a note; when neither condition varies
  across seeds (exact byte counts) the interval is the ratio itself.
- **Memory and time families** (kind ``memory_time``: QLoRA vs LoRA vs full finetuning) measure cost,
  not accuracy, and may have no accuracy rows at all. Besides the metrics every family gets, each
  variant is compared with the baseline on the family's *memory metric* (``peak_cuda_allocated`` when
  the family recorded it, i.e. ran on a GPU, else the exact ``state_bytes``: weights + gradients +
  optimizer state), on ``median_step_time``, ``tokens_per_second`` and ``base_weight_bytes``, with the
  same machinery (paired when seeds are shared, Holm within family and metric). ``cost_summary``
  gives their means and intervals per variant, beside the method, model, optimizer, LoRA targets,
  sequence length, precision and device of each variant. In these families a metric without rows
  from finished runs (accuracy, typically) simply gets no comparison, instead of rows of NaN.
- **Seed consistency** (``seed_consistency``): how noisy each condition is, and how many seeds per
  arm a study would need to detect a one-point (0.01) accuracy difference with power 0.8 at
  alpha 0.05 (``statsmodels.stats.power``), unpaired and, against the baseline, paired.
- **Numerical failures** (``NUMERICAL_ERRORS``: a singular matrix, a root finder without a sign change, an
  overflow) are caught at the one computation that raises them: that number is NaN and the row's ``note``
  (``ci_method`` in the summary) names the failure; the rest of the row and of the tables are written.

Columns of the tests table (``tests.parquet``), one row per comparison:

=====================  ===========================================================================
family, family_kind    the family and its registry kind
metric, split, stage   what was compared (``stage`` is ``epoch`` for epochs families)
variant, baseline      the two conditions; for epochs families ``"<variant>@epoch<k>"`` vs
                       ``"<variant>@epoch1"``
unit, higher_is_better the metric's unit and direction
n_variant, n_baseline  ok runs in each condition
n_pairs                seeds the two share (the pairs used when ``paired``)
paired                 whether the paired tests were used
mean_variant,          means over the runs used (the common seeds when paired, so that
mean_baseline          ``diff == mean_variant - mean_baseline``)
diff                   variant minus baseline, in the metric's unit (accuracy: fraction, 0.01 = 1 point)
diff_ci_low/high       95 % t interval of the mean difference (paired or Welch)
ratio                  ``mean_variant / mean_baseline`` (NaN when the baseline mean is 0)
ratio_ci_low/high      95 % Fieller interval of the ratio (paired or Welch; see "Ratios" above)
effect_size            Cohen's d_z (paired) or d (unpaired); ``effect_size_kind`` names it
effect_ci_low/high     95 % interval of the effect size by noncentral-t inversion
test, p_value          primary test (``"paired t"`` / ``"Welch t"``) and its two-sided p-value
p_holm                 Holm-adjusted p-value of the primary test within the family
nonparametric_test     ``"Wilcoxon signed-rank"`` / ``"Mann-Whitney U"``
p_nonparametric(_holm) its p-value, raw and Holm-adjusted within the family
exact                  a byte or count metric (unit ``bytes`` / ``count``) on which every run of each
                       condition gave the same value (>= 2 runs each) and the two differ: a deterministic
                       difference, e.g. the bytes of 4-bit vs 16-bit base weights. There is no noise to
                       test against, so the p-values are NaN and the difference is taken as established
significant            ``p_holm < 0.05``, or ``exact``
direction              ``"higher"`` / ``"lower"`` (variant vs baseline) when significant, else ``"n.s."``
verdict                ``"better"`` / ``"worse"`` / ``"n.s."``: ``direction`` read through
                       ``higher_is_better``
note                   why a p-value is missing, which runs were lost, and similar caveats
=====================  ===========================================================================

With five pairs the exact Wilcoxon test cannot give a two-sided p below 2/32 = 0.0625, so it can
only confirm a t-test result from about six seeds on; the report says so.
"""

from __future__ import annotations

import math
import warnings
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import optimize, stats
from statsmodels.stats.power import TTestIndPower, TTestPower

from lora_bench.atomic import write_table
from lora_bench.study import LORA_VARIANTS_KIND, SWEEP_KIND, TUNE_KIND, VARIANCE_KIND

CONFIDENCE = 0.95
ALPHA = 0.05
BOOTSTRAP_RESAMPLES = 4999
# A fixed seed makes the bootstrap intervals, and so the committed tables, reproducible.
BOOTSTRAP_SEED = 20240607
# One accuracy point: the smallest difference the reference write-ups discuss.
ONE_POINT = 0.01
TARGET_POWER = 0.8
# The numerical failures a computation on degenerate data can raise (a singular matrix, a root finder
# without a sign change, an overflow). Each is caught at the one computation that raises it and becomes NaN
# with a note on that row; anything else is a bug and propagates.
NUMERICAL_ERRORS = (np.linalg.LinAlgError, ValueError, FloatingPointError, ZeroDivisionError, OverflowError)
# Units whose values are deterministic by construction, so that identical runs mean an exact value.
EXACT_UNITS = ("bytes", "count")

MEMORY_TIME_KIND = "memory_time"
# Kinds whose runs cross data seeds (variance) or run once per configuration and re-run the best (sweep):
# their variants are not tested against a baseline here; lora_bench.analysis.variance analyses them.
# Kinds analysed in their own modules, not against a baseline: variance and sweep (lora_bench.analysis.variance) cross
# data and train seeds; tune families (lora_bench.analysis.tuning) only choose a value for the family they tune.
SEED_CROSSING_KINDS = (VARIANCE_KIND, SWEEP_KIND, TUNE_KIND)
# The memory metric of a memory_time family: the first one the family recorded. Peak allocated CUDA memory
# is what a GPU user pays; without a GPU, the exact bytes of weights + gradients + optimizer state are the
# part of memory that the method decides (the process's peak RSS is mostly the Python runtime).
MEMORY_TIME_MEMORY_METRICS = ("peak_cuda_allocated", "state_bytes")
MEMORY_TIME_TIME_METRIC = "median_step_time"
MEMORY_TIME_OTHER_METRICS = ("tokens_per_second", "base_weight_bytes")
# What shipping and serving a LoRA variant costs (lora_bench.adapters.serving), compared in lora_variants families.
SERVING_METRICS = ("adapter_bytes", "inference_overhead", "inference_latency_unmerged")
# Kinds whose families get cost tests and the cost summary: kind -> the metrics beside memory and step time.
COST_FAMILY_KINDS: dict[str, tuple[str, ...]] = {
    MEMORY_TIME_KIND: MEMORY_TIME_OTHER_METRICS,
    LORA_VARIANTS_KIND: SERVING_METRICS,
}

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

TESTS_COLUMNS = [
    "family", "family_kind", "metric", "split", "stage", "variant", "baseline", "unit", "higher_is_better",
    "n_variant", "n_baseline", "n_pairs", "paired", "mean_variant", "mean_baseline", "diff", "diff_ci_low",
    "diff_ci_high", "ratio", "ratio_ci_low", "ratio_ci_high", "effect_size", "effect_size_kind", "effect_ci_low",
    "effect_ci_high", "test", "p_value", "p_holm", "nonparametric_test", "p_nonparametric", "p_nonparametric_holm",
    "exact", "significant", "direction", "verdict", "untrained_variant", "untrained_baseline", "convergence",
    "note",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Selecting rows


def family_order(frame: pd.DataFrame) -> list[str]:
    """Families in order of first appearance, the order the config lists them in."""
    return list(dict.fromkeys(frame["family"].tolist()))


def _ok(metrics: pd.DataFrame) -> pd.DataFrame:
    if "status" not in metrics.columns:
        return metrics
    return metrics[metrics["status"] == "ok"]


def select_values(
    metrics: pd.DataFrame, metric: str = "accuracy", split: str = "test", stage: str = "final"
) -> pd.DataFrame:
    """Rows of ok runs for one metric, split and stage."""
    ok = _ok(metrics)
    return ok[(ok["metric"] == metric) & (ok["split"] == split) & (ok["stage"] == stage)]


def _metric_meta(rows: pd.DataFrame) -> tuple[str, bool]:
    unit = str(rows["unit"].iloc[0]) if "unit" in rows.columns and len(rows) else ""
    higher = (
        bool(rows["higher_is_better"].iloc[0]) if "higher_is_better" in rows.columns and len(rows) else True
    )
    return unit, higher


def _by_seed(rows: pd.DataFrame) -> pd.Series:
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
    unit, higher = _metric_meta(rows)
    out = []
    for key, group in rows.groupby(keys, sort=False):
        key = key if isinstance(key, tuple) else (key,)
        values = _by_seed(group)
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


def _order_like_input(frame: pd.DataFrame, source: pd.DataFrame) -> pd.DataFrame:
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
    return _order_like_input(summary, metrics)


def summarize_epochs(metrics: pd.DataFrame, metric: str = "accuracy", split: str = "test") -> pd.DataFrame:
    """Per (family, variant, epoch) over ok runs, from the ``stage == "epoch"`` rows."""
    rows = select_values(metrics, metric, split, "epoch")
    summary = pd.DataFrame(_summary_rows(rows, ["family", "variant", "epoch"], metric, split, "epoch"))
    summary = summary.reindex(columns=SUMMARY_COLUMNS)
    if summary.empty:
        return summary
    summary["epoch"] = summary["epoch"].astype("Int64")
    summary = _order_like_input(summary, metrics)
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
# Effect sizes


def _noncentral_t_interval(t_observed: float, df: float) -> tuple[float, float]:
    """95 % interval of the noncentrality parameter given an observed t (Steiger & Fouladi 1997).

    An end whose root search fails (no bracket, no sign change, no convergence) is NaN; ``compare_two``
    notes it.
    """
    if not np.isfinite(t_observed) or df <= 0:
        return math.nan, math.nan
    tail = (1 - CONFIDENCE) / 2

    def solve(target: float) -> float:
        # cdf(t_obs; ncp) falls monotonically in ncp; widen the bracket until it contains the root.
        def f(ncp: float) -> float:
            probability = stats.nct.cdf(t_observed, df, ncp)
            if np.isnan(probability):
                # scipy's nct.cdf returns NaN far in the tails, where the cdf is 1 (ncp well below t) or 0.
                probability = 1.0 if ncp < t_observed else 0.0
            return probability - target

        width = 10.0 + abs(t_observed)
        low, high = t_observed - width, t_observed + width
        for _ in range(20):
            if f(low) > 0 > f(high):
                try:
                    return optimize.brentq(f, low, high, xtol=1e-10)
                except (RuntimeError, *NUMERICAL_ERRORS):
                    # No sign change after all (nct.cdf is not exactly monotone far out) or no convergence.
                    return math.nan
            width *= 2
            low, high = t_observed - width, t_observed + width
        return math.nan

    return solve(1 - tail), solve(tail)


def cohens_dz(differences: np.ndarray) -> tuple[float, float, float]:
    """Paired effect size d_z = mean(d) / sd(d) with its noncentral-t 95 % interval."""
    n = len(differences)
    sd = float(np.std(differences, ddof=1)) if n > 1 else math.nan
    if n < 2 or sd == 0.0 or not np.isfinite(sd):
        return math.nan, math.nan, math.nan
    dz = float(np.mean(differences)) / sd
    low, high = _noncentral_t_interval(dz * math.sqrt(n), n - 1)
    return dz, low / math.sqrt(n), high / math.sqrt(n)


def cohens_d(variant: np.ndarray, baseline: np.ndarray) -> tuple[float, float, float]:
    """Unpaired effect size d = (mean difference) / pooled sd with its noncentral-t 95 % interval."""
    n1, n2 = len(variant), len(baseline)
    if n1 < 2 or n2 < 2:
        return math.nan, math.nan, math.nan
    pooled = math.sqrt(
        ((n1 - 1) * np.var(variant, ddof=1) + (n2 - 1) * np.var(baseline, ddof=1)) / (n1 + n2 - 2)
    )
    if pooled == 0.0:
        return math.nan, math.nan, math.nan
    d = (float(np.mean(variant)) - float(np.mean(baseline))) / pooled
    scale = math.sqrt(1 / n1 + 1 / n2)
    low, high = _noncentral_t_interval(d / scale, n1 + n2 - 2)
    return d, low * scale, high * scale


# ----------------------------------------------------------------------------------------------------
# Ratios


def ratio_interval(variant: np.ndarray, baseline: np.ndarray, paired: bool) -> tuple[float, float, float, str]:
    """``mean(variant) / mean(baseline)`` with its 95 % Fieller interval: ``(ratio, low, high, note)``.

    The interval holds every rho for which the t test of ``variant - rho * baseline`` has p >= 0.05:
    paired (arrays aligned by seed), the one-sample t test of ``v_i - rho * b_i`` with n - 1 degrees of
    freedom; unpaired, Welch's test, with the Welch-Satterthwaite degrees of freedom evaluated at the
    estimated ratio. Solving ``(a - rho c)^2 = t^2 (s_aa - 2 rho s_ac + rho^2 s_cc)`` (a, c the means;
    s the variances and covariance of the means) gives the two ends. When the baseline mean is not
    clearly nonzero (``c^2 <= t^2 s_cc``) the set is unbounded: NaN ends and a note.
    """
    variant, baseline = np.asarray(variant, dtype=float), np.asarray(baseline, dtype=float)
    n1, n2 = len(variant), len(baseline)
    if n1 == 0 or n2 == 0:
        return math.nan, math.nan, math.nan, ""
    if np.mean(baseline) == 0.0:
        return math.nan, math.nan, math.nan, "the baseline mean is zero: no ratio"
    # Work in units of the baseline mean: the ratio is unchanged and the quadratic is well conditioned.
    scale = abs(float(np.mean(baseline)))
    variant, baseline = variant / scale, baseline / scale
    a, c = float(np.mean(variant)), float(np.mean(baseline))
    ratio = a / c
    if n1 < 2 or n2 < 2:
        return ratio, math.nan, math.nan, ""
    if paired:
        if n1 != n2:
            raise ValueError("a paired ratio needs values aligned by seed")
        with np.errstate(over="ignore", invalid="ignore"):
            covariance = np.cov(variant, baseline, ddof=1) / n1
        s_aa, s_cc, s_ac = float(covariance[0, 0]), float(covariance[1, 1]), float(covariance[0, 1])
        df = n1 - 1.0
    else:
        with np.errstate(over="ignore", invalid="ignore"):
            s_aa, s_cc, s_ac = float(np.var(variant, ddof=1)) / n1, float(np.var(baseline, ddof=1)) / n2, 0.0
        try:
            numerator = (s_aa + ratio**2 * s_cc) ** 2
            denominator = s_aa**2 / (n1 - 1) + (ratio**2 * s_cc) ** 2 / (n2 - 1)
        except OverflowError:
            return ratio, math.nan, math.nan, "ratio interval not computable (OverflowError)"
        df = numerator / denominator if denominator > 0 else math.inf
    if s_aa == 0.0 and s_cc == 0.0:
        return ratio, ratio, ratio, ""  # neither condition varies across seeds: the ratio is exact
    if not np.isfinite([s_aa, s_cc, s_ac, df]).all():
        # numpy overflows to inf where Python floats raise: the same failure, so the same note.
        return ratio, math.nan, math.nan, "ratio interval not computable (OverflowError)"
    try:
        return _fieller(ratio, a, c, s_aa, s_cc, s_ac, df)
    except NUMERICAL_ERRORS as error:
        # Values spanning hundreds of orders of magnitude overflow the quadratic (Python floats raise).
        return ratio, math.nan, math.nan, f"ratio interval not computable ({type(error).__name__})"


def _fieller(ratio: float, a: float, c: float, s_aa: float, s_cc: float, s_ac: float, df: float):
    """The Fieller ends of ``ratio_interval`` (see there); may raise ``OverflowError`` on extreme values."""
    t_squared = float(stats.t.ppf(1 - (1 - CONFIDENCE) / 2, df)) ** 2
    quadratic = c * c - t_squared * s_cc
    if quadratic <= 0:
        return ratio, math.nan, math.nan, "ratio interval unbounded: the baseline mean is not clearly nonzero"
    half_linear = a * c - t_squared * s_ac
    constant = a * a - t_squared * s_aa
    root = math.sqrt(max(half_linear**2 - quadratic * constant, 0.0))
    return ratio, (half_linear - root) / quadratic, (half_linear + root) / quadratic, ""


# ----------------------------------------------------------------------------------------------------
# One comparison


def _nan_comparison() -> dict:
    return {
        "n_pairs": 0,
        "paired": False,
        "mean_variant": math.nan,
        "mean_baseline": math.nan,
        "diff": math.nan,
        "diff_ci_low": math.nan,
        "diff_ci_high": math.nan,
        "ratio": math.nan,
        "ratio_ci_low": math.nan,
        "ratio_ci_high": math.nan,
        "effect_size": math.nan,
        "effect_size_kind": "",
        "effect_ci_low": math.nan,
        "effect_ci_high": math.nan,
        "test": "",
        "p_value": math.nan,
        "nonparametric_test": "",
        "p_nonparametric": math.nan,
    }


def _t_test(run, result: dict, notes: list[str]) -> None:
    """p-value and 95 % interval of a scipy t test into ``result``; a numerical failure becomes a note."""
    try:
        t_result = run()
        interval = t_result.confidence_interval(CONFIDENCE)
    except NUMERICAL_ERRORS as error:
        notes.append(f"t test failed ({type(error).__name__})")
    else:
        result.update(p_value=float(t_result.pvalue), diff_ci_low=float(interval.low),
                      diff_ci_high=float(interval.high))


def compare_two(variant: pd.Series, baseline: pd.Series) -> dict:
    """Compare two conditions given as values indexed by seed; paired when they share >= 2 seeds."""
    result = _nan_comparison()
    notes: list[str] = []
    common = variant.index.intersection(baseline.index)
    result["n_pairs"] = len(common)
    result["mean_variant"] = float(variant.mean()) if len(variant) else math.nan
    result["mean_baseline"] = float(baseline.mean()) if len(baseline) else math.nan
    if len(variant) < 2 or len(baseline) < 2:
        short = [
            f"{name} has {len(values)} ok run(s)"
            for name, values in (("variant", variant), ("baseline", baseline))
            if len(values) < 2
        ]
        notes.append(" and ".join(short) + " (a test needs at least 2 of each)")
        result["diff"] = result["mean_variant"] - result["mean_baseline"]
        if len(variant) and len(baseline):
            result["ratio"], _, _, ratio_note = ratio_interval(variant.to_numpy(), baseline.to_numpy(), False)
            notes.append(ratio_note)
        result["note"] = "; ".join(n for n in notes if n)
        return result

    if len(common) >= 2:
        v = variant.loc[common].to_numpy()
        b = baseline.loc[common].to_numpy()
        dropped = (len(variant) - len(common)) + (len(baseline) - len(common))
        if dropped:
            notes.append(f"paired on the {len(common)} common seeds ({dropped} unpaired run(s) left out)")
        differences = v - b
        result.update(
            paired=True,
            mean_variant=float(v.mean()),
            mean_baseline=float(b.mean()),
            diff=float(differences.mean()),
            test="paired t",
            nonparametric_test="Wilcoxon signed-rank",
            effect_size_kind="d_z",
        )
        if np.std(differences) == 0.0:
            # A t statistic of +-inf (p = 0) would claim certainty from a degenerate sample.
            notes.append("the paired differences have zero variance: t test undefined")
            result["diff_ci_low"] = result["diff_ci_high"] = result["diff"]
        else:
            _t_test(lambda: stats.ttest_rel(v, b), result, notes)
        if np.all(differences == 0):
            result["p_nonparametric"] = 1.0  # identical results: no evidence of any difference
        else:
            try:
                with warnings.catch_warnings():
                    warnings.simplefilter("ignore")
                    result["p_nonparametric"] = float(stats.wilcoxon(v, b).pvalue)
            except NUMERICAL_ERRORS as error:
                notes.append(f"Wilcoxon test failed ({type(error).__name__})")
        result["effect_size"], result["effect_ci_low"], result["effect_ci_high"] = cohens_dz(differences)
        ratio = ratio_interval(v, b, paired=True)
    else:
        v, b = variant.to_numpy(), baseline.to_numpy()
        if len(common):
            notes.append(f"only {len(common)} common seed: compared unpaired")
        result.update(
            paired=False,
            diff=float(v.mean() - b.mean()),
            test="Welch t",
            nonparametric_test="Mann-Whitney U",
            effect_size_kind="d",
        )
        if np.std(v) == 0.0 and np.std(b) == 0.0:
            notes.append("both conditions have zero variance: t test undefined")
            result["diff_ci_low"] = result["diff_ci_high"] = result["diff"]
        else:
            _t_test(lambda: stats.ttest_ind(v, b, equal_var=False), result, notes)
        try:
            result["p_nonparametric"] = float(stats.mannwhitneyu(v, b, alternative="two-sided").pvalue)
        except NUMERICAL_ERRORS as error:
            notes.append(f"Mann-Whitney U test failed ({type(error).__name__})")
        result["effect_size"], result["effect_ci_low"], result["effect_ci_high"] = cohens_d(v, b)
        ratio = ratio_interval(v, b, paired=False)
    if np.isfinite(result["effect_size"]) and not (
        np.isfinite(result["effect_ci_low"]) and np.isfinite(result["effect_ci_high"])
    ):
        notes.append("effect-size interval not computable (noncentral-t root search failed)")
    result["ratio"], result["ratio_ci_low"], result["ratio_ci_high"] = ratio[:3]
    notes.append(ratio[3])
    result["note"] = "; ".join(n for n in notes if n)
    return result


def holm_adjust(p_values: np.ndarray) -> np.ndarray:
    """Holm step-down adjusted p-values (same numbers as ``multipletests(p, method="holm")[1]``).

    Written out because statsmodels' Holm branch runs a full ``gc.collect()`` on every call, which costs
    tens of milliseconds in a process holding pandas and matplotlib; the tests check that both agree.
    """
    p_values = np.asarray(p_values, dtype=float)
    m = len(p_values)
    if m == 0:
        return p_values
    order = np.argsort(p_values, kind="stable")
    stepped = np.maximum.accumulate(p_values[order] * np.arange(m, 0, -1))
    adjusted = np.empty(m)
    adjusted[order] = np.minimum(stepped, 1.0)
    return adjusted


def _holm(p_values: pd.Series) -> pd.Series:
    """Holm-adjusted p-values over the non-missing entries; missing stay missing."""
    adjusted = pd.Series(np.nan, index=p_values.index)
    present = p_values.dropna()
    if len(present):
        adjusted.loc[present.index] = holm_adjust(present.to_numpy())
    return adjusted


def _finish(rows: list[dict]) -> pd.DataFrame:
    tests = pd.DataFrame(rows).reindex(columns=TESTS_COLUMNS)
    if tests.empty:
        return tests
    # Holm within each family; one call handles one metric and split, so that is the grouping.
    for index in tests.groupby(["family", "metric", "split"], sort=False).groups.values():
        tests.loc[index, "p_holm"] = _holm(tests.loc[index, "p_value"]).to_numpy()
        tests.loc[index, "p_nonparametric_holm"] = _holm(tests.loc[index, "p_nonparametric"]).to_numpy()
    tests["exact"] = tests["exact"].fillna(False).astype(bool)
    tests["significant"] = ((tests["p_holm"] < ALPHA).fillna(False) | tests["exact"]).astype(bool)
    higher = np.where(tests["diff"] > 0, "higher", "lower")
    tests["direction"] = np.where(tests["significant"], higher, "n.s.")
    better = (tests["diff"] > 0) == tests["higher_is_better"].astype(bool)
    tests["verdict"] = np.where(tests["significant"], np.where(better, "better", "worse"), "n.s.")
    tests["paired"] = tests["paired"].astype(bool)
    tests["higher_is_better"] = tests["higher_is_better"].astype(bool)
    for column in ("n_variant", "n_baseline", "n_pairs", "untrained_variant", "untrained_baseline"):
        tests[column] = tests[column].fillna(0).astype(int)
    tests["convergence"] = tests["convergence"].fillna("unknown")
    tests["note"] = tests["note"].fillna("")
    return tests


# ----------------------------------------------------------------------------------------------------
# The tests table


def baseline_variant(runs: pd.DataFrame, family: str) -> tuple[str | None, str]:
    """The family's baseline variant (``is_baseline``) and a note when the flag is missing or repeated."""
    flagged = runs[(runs["family"] == family) & runs["is_baseline"].astype(bool)]["variant"].unique()
    if len(flagged) == 1:
        return str(flagged[0]), ""
    if len(flagged) == 0:
        return None, "family has no baseline variant (is_baseline)"
    return str(flagged[0]), f"family flags {len(flagged)} baselines; using {flagged[0]!r}"


def _exact_difference(variant: pd.Series, baseline: pd.Series) -> bool:
    """Whether both conditions gave one value in every run (>= 2 runs each) and the two values differ."""
    if len(variant) < 2 or len(baseline) < 2 or variant.nunique() != 1 or baseline.nunique() != 1:
        return False
    return bool(variant.iloc[0] != baseline.iloc[0])


def _failed_note(runs: pd.DataFrame, family: str, variant: str) -> str:
    if "status" not in runs.columns:
        return ""
    failed = runs[(runs["family"] == family) & (runs["variant"] == variant) & (runs["status"] != "ok")]
    return f"{len(failed)} failed run(s) of {variant} excluded" if len(failed) else ""


CONVERGENCE_NOTES = {
    "trained": "",
    "inconclusive": "inconclusive: training did not converge",
    "as_expected": "as expected: the variant declares expect: no_learning",
    "unknown": "",
}


def _untrained(runs: pd.DataFrame, family: str, variant: str) -> tuple[int, bool]:
    """(finished runs of the variant whose training did not converge, whether the variant expects that).

    A run did not converge when the learning diagnostics (lora_bench.run.diagnostics) say it did not learn,
    collapsed, diverged or did not plateau (``trained`` is False); runs without diagnostics are not counted.
    """
    rows = runs[(runs["family"] == family) & (runs["variant"] == variant) & (runs["status"] == "ok")]
    flagged = int((rows["trained"] == False).sum()) if "trained" in rows else 0  # noqa: E712 (None stays out)
    expected = bool("expect" in rows and (rows["expect"] == "no_learning").any())
    return flagged, expected


def convergence(runs: pd.DataFrame, family: str, variant: str, baseline: str | None) -> dict:
    """Whether a comparison rests on runs that trained: ``convergence`` is ``trained``, ``inconclusive`` (a run of
    either side did not converge), ``as_expected`` (only runs of a variant that declares ``expect: no_learning``
    did not) or ``unknown`` (records without diagnostics)."""
    if "trained" not in runs or runs.loc[runs["family"] == family, "trained"].isna().all():
        return {"untrained_variant": 0, "untrained_baseline": 0, "convergence": "unknown"}
    n_variant, expected = _untrained(runs, family, variant)
    n_baseline = _untrained(runs, family, baseline)[0] if baseline and baseline != variant else 0
    state = "trained"
    if n_variant or n_baseline:
        state = "as_expected" if expected and not n_baseline else "inconclusive"
    return {"untrained_variant": n_variant, "untrained_baseline": n_baseline, "convergence": state}


def compare_to_baseline(
    metrics: pd.DataFrame,
    runs: pd.DataFrame,
    metric: str = "accuracy",
    split: str = "test",
    stage: str = "final",
) -> pd.DataFrame:
    """The tests table for one metric and split: every variant against its family's baseline.

    Families of kind ``epochs`` compare every epoch with epoch 1 of the same variant instead (always on
    the ``stage == "epoch"`` rows). See the module docstring for the columns.
    """
    rows: list[dict] = []
    for family in family_order(runs):
        family_runs = runs[runs["family"] == family]
        kind = str(family_runs["family_kind"].iloc[0])
        if kind == "epochs":
            rows.extend(_compare_epochs(metrics, runs, family, kind, metric, split))
            continue
        if kind in SEED_CROSSING_KINDS:
            continue
        everywhere = select_values(metrics, metric, split, stage)
        selected = everywhere[everywhere["family"] == family]
        has_ok_runs = bool((family_runs["status"] == "ok").any()) if "status" in family_runs else True
        if everywhere.empty or (selected.empty and (has_ok_runs or kind == MEMORY_TIME_KIND)):
            # The metric was not recorded for this family (e.g. GPU memory on a CPU run): nothing to say.
            # A family whose runs all failed still gets its rows, so the report can say so; not a memory
            # and time family, which may never evaluate accuracy: its cost summary lists the failures.
            continue
        unit, higher = _metric_meta(everywhere)
        baseline, baseline_note = baseline_variant(runs, family)
        variants = list(dict.fromkeys(family_runs["variant"].tolist()))
        for variant in variants:
            if variant == baseline:
                continue
            values = _by_seed(selected[selected["variant"] == variant])
            base_values = (
                _by_seed(selected[selected["variant"] == baseline]) if baseline else pd.Series(dtype=float)
            )
            comparison = compare_two(values, base_values) if baseline else _nan_comparison()
            exact = unit in EXACT_UNITS and _exact_difference(values, base_values)
            notes = [baseline_note, comparison.get("note", "")]
            if exact:
                notes.append("exact: every run of both conditions gave the same value, so there is nothing to test")
            notes += [
                _failed_note(runs, family, variant),
                _failed_note(runs, family, baseline) if baseline else "",
            ]
            comparison.update(
                family=family,
                family_kind=kind,
                metric=metric,
                split=split,
                stage=stage,
                variant=variant,
                baseline=baseline or "",
                unit=unit,
                higher_is_better=higher,
                n_variant=len(values),
                n_baseline=len(base_values),
                exact=exact,
                note="; ".join(n for n in notes if n),
                **convergence(runs, family, variant, baseline),
            )
            rows.append(comparison)
    return _finish(rows)


def _compare_epochs(
    metrics: pd.DataFrame, runs: pd.DataFrame, family: str, kind: str, metric: str, split: str
) -> list[dict]:
    selected = select_values(metrics, metric, split, "epoch")
    selected = selected[selected["family"] == family]
    if selected.empty:
        return []
    unit, higher = _metric_meta(selected)
    rows = []
    for variant in dict.fromkeys(runs[runs["family"] == family]["variant"].tolist()):
        per_variant = selected[selected["variant"] == variant]
        if per_variant.empty:
            continue
        first = _by_seed(per_variant[per_variant["epoch"] == 1])
        for epoch in sorted(int(e) for e in per_variant["epoch"].unique() if int(e) != 1):
            later = _by_seed(per_variant[per_variant["epoch"] == epoch])
            comparison = compare_two(later, first)
            notes = [comparison.get("note", ""), _failed_note(runs, family, variant)]
            comparison.update(
                family=family,
                family_kind=kind,
                metric=metric,
                split=split,
                stage="epoch",
                variant=f"{variant}@epoch{epoch}",
                baseline=f"{variant}@epoch1",
                unit=unit,
                higher_is_better=higher,
                n_variant=len(later),
                n_baseline=len(first),
                note="; ".join(n for n in notes if n),
                **convergence(runs, family, variant, None),
            )
            rows.append(comparison)
    return rows


# ----------------------------------------------------------------------------------------------------
# Instruction finetuning: the claims of reference B

INSTRUCT_KIND = "instruct"

# (key, the reference's claim, what is compared). Each claim compares two conditions of one instruct family,
# found from the runs' resolved configs rather than from variant names, so a study may name them freely.
INSTRUCT_CLAIMS: tuple[tuple[str, str], ...] = (
    ("epochs", "Two epochs over the instructions are worse than one (overfitting)"),
    ("data_quality", "A small clean instruction set beats a several times larger noisy one (LIMA 1k beat Alpaca 50k)"),
    ("coverage", "LoRA on all linear layers beats query+value only"),
    ("alpha", "alpha = 2r is a good default (against alpha = r at the same r)"),
    ("cosine_sgd", "A cosine schedule helps SGD (against a constant learning rate)"),
)
ALL_LINEAR = {"query", "key", "value", "projection", "mlp"}

CLAIM_COLUMNS = ["family", "claim", "statement", "comparison", "metric", "split", "stage", "better", "worse",
                 "unit", "higher_is_better", "n_pairs", "paired", "mean_better", "mean_worse", "diff",
                 "diff_ci_low", "diff_ci_high", "test", "p_value", "p_holm", "support", "note"]


def _variant_settings(runs: pd.DataFrame, family: str) -> dict[str, dict]:
    """Resolved config values (``cfg.*`` columns) of each variant of ``family``, from its first run."""
    part = runs[runs["family"] == family]
    return {variant: rows.iloc[0].to_dict() for variant, rows in part.groupby("variant", sort=False)}


def _number(value, default=math.nan) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        return default
    return default if math.isnan(out) else out


def _targets(settings: dict) -> set[str]:
    return set(str(settings.get("cfg.method.lora.targets") or "").split("+")) - {""}


def _same_method(a: dict, b: dict) -> bool:
    return a.get("cfg.method.name") == b.get("cfg.method.name")


def instruct_pairs(runs: pd.DataFrame, family: str) -> dict[str, tuple]:
    """For each claim: (condition claimed better, condition claimed worse, stage), where a condition is a
    variant, or ``(variant, epoch)`` for the epochs claim. Claims whose conditions the family lacks are left out."""
    settings = _variant_settings(runs, family)
    baseline, _ = baseline_variant(runs, family)
    base = settings.get(baseline, {})
    pairs: dict[str, tuple] = {}
    multi_epoch = [v for v, c in settings.items() if _number(c.get("cfg.train.epochs"), 1) >= 2]
    if multi_epoch:
        variant = baseline if baseline in multi_epoch else multi_epoch[0]
        pairs["epochs"] = ((variant, 1), (variant, 2), "epoch")
    noisy = [v for v, c in settings.items() if _number(c.get("cfg.instruct.noise_fraction"), 0.0) > 0]
    # On the Hub profile the real thing: LIMA (1k curated) against the Alpaca baseline (50k).
    lima = [v for v, c in settings.items() if "lima" in str(c.get("cfg.data.name", "")).lower()]
    if noisy and baseline and _number(base.get("cfg.instruct.noise_fraction"), 0.0) == 0:
        pairs["data_quality"] = (baseline, noisy[0], "final")
    elif lima and "alpaca" in str(base.get("cfg.data.name", "")).lower():
        pairs["data_quality"] = (lima[0], baseline, "final")
    if baseline and _targets(base) == {"query", "value"}:
        wide = [v for v, c in settings.items() if ALL_LINEAR <= _targets(c) and _same_method(c, base)
                and _number(c.get("cfg.method.lora.rank")) == _number(base.get("cfg.method.lora.rank"))]
        if wide:
            pairs["coverage"] = (wide[0], baseline, "final")
    rank, alpha = _number(base.get("cfg.method.lora.rank")), _number(base.get("cfg.method.lora.alpha"))
    if baseline and alpha == 2 * rank:
        equal = [v for v, c in settings.items() if _number(c.get("cfg.method.lora.rank")) == rank
                 and _number(c.get("cfg.method.lora.alpha")) == rank and _targets(c) == _targets(base)]
        if equal:
            pairs["alpha"] = (baseline, equal[0], "final")
    sgd = {c.get("cfg.train.schedule"): v for v, c in settings.items() if c.get("cfg.train.optimizer") == "sgd"}
    if "cosine" in sgd and "constant" in sgd:
        pairs["cosine_sgd"] = (sgd["cosine"], sgd["constant"], "final")
    return pairs


def _condition_values(rows: pd.DataFrame, condition) -> pd.Series:
    if isinstance(condition, tuple):
        variant, epoch = condition
        rows = rows[(rows["variant"] == variant) & (rows["epoch"] == epoch)]
    else:
        rows = rows[rows["variant"] == condition]
    return _by_seed(rows)


def _condition_name(condition) -> str:
    return f"{condition[0]}@epoch{condition[1]}" if isinstance(condition, tuple) else str(condition)


def instruct_claims(metrics: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Each reference-B claim an instruct family can test: the claimed-better condition minus the claimed-worse
    one on test accuracy (test response loss when there is no closed answer set), paired on seed when possible,
    Holm-adjusted over the claims of the family. ``support``: ``supported`` (significant in the claimed
    direction), ``contradicted`` (significant the other way) or ``not shown`` (n.s., or untestable)."""
    rows: list[dict] = []
    families = family_order(runs[runs["family_kind"] == INSTRUCT_KIND]) if "family_kind" in runs else []
    statements = dict(INSTRUCT_CLAIMS)
    for family in families:
        family_rows = []
        family_metrics = metrics[metrics["family"] == family]
        # Closed answers give accuracy; open-ended data the LM evaluation harness (its mean over tasks) when it
        # ran, else the held-out response loss (comparable only between variants trained on the same data).
        if not select_values(family_metrics, "accuracy", "test").empty:
            metric, split = "accuracy", "test"
        elif not select_values(family_metrics, "lm_eval", "mean").empty:
            metric, split = "lm_eval", "mean"
        else:
            metric, split = "loss", "test"
        for claim, (better, worse, stage) in instruct_pairs(runs, family).items():
            claim_split = "test" if stage == "epoch" and metric == "lm_eval" else split
            claim_metric = "loss" if stage == "epoch" and metric == "lm_eval" else metric
            selected = select_values(metrics, claim_metric, claim_split, stage)
            selected = selected[selected["family"] == family]
            unit, higher = _metric_meta(selected) if len(selected) else ("", claim_metric != "loss")
            first, second = _condition_values(selected, better), _condition_values(selected, worse)
            comparison = compare_two(first, second)
            family_rows.append({
                "family": family, "claim": claim, "statement": statements[claim],
                "comparison": f"{_condition_name(better)} vs {_condition_name(worse)}",
                "metric": claim_metric, "split": claim_split, "stage": stage,
                "better": _condition_name(better), "worse": _condition_name(worse),
                "unit": unit, "higher_is_better": higher,
                "n_pairs": comparison["n_pairs"], "paired": comparison["paired"],
                "mean_better": comparison["mean_variant"], "mean_worse": comparison["mean_baseline"],
                "diff": comparison["diff"], "diff_ci_low": comparison["diff_ci_low"],
                "diff_ci_high": comparison["diff_ci_high"], "test": comparison["test"],
                "p_value": comparison["p_value"], "note": comparison.get("note", ""),
            })
        if not family_rows:
            continue
        frame = pd.DataFrame(family_rows)
        frame["p_holm"] = _holm(frame["p_value"]).to_numpy()
        significant = (frame["p_holm"] < ALPHA).fillna(False)
        as_claimed = np.where(frame["higher_is_better"].astype(bool), frame["diff"] > 0, frame["diff"] < 0)
        frame["support"] = np.where(significant, np.where(as_claimed, "supported", "contradicted"), "not shown")
        rows.extend(frame.to_dict("records"))
    return pd.DataFrame(rows).reindex(columns=CLAIM_COLUMNS)


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


def welch_from_summary(
    mean: float, std: float, n: int, other_mean: float, other_std: float, other_n: int
) -> float:
    """Two-sided Welch t-test p-value from summary statistics (for references that report mean +- std)."""
    if n < 2 or other_n < 2 or not (np.isfinite(std) and np.isfinite(other_std)) or std == other_std == 0:
        return math.nan
    return float(
        stats.ttest_ind_from_stats(mean, std, n, other_mean, other_std, other_n, equal_var=False).pvalue
    )


# ----------------------------------------------------------------------------------------------------
# Seed consistency


def _seeds_needed(effect_size: float, paired: bool) -> float:
    """``_seeds_needed_noted`` without the note."""
    return _seeds_needed_noted(effect_size, paired)[0]


def _seeds_needed_noted(effect_size: float, paired: bool) -> tuple[float, str]:
    """Fewest seeds per arm giving power 0.8 at alpha 0.05 (two-sided); NaN when the effect is undefined.

    Searches the integer seed count on statsmodels' power function (power rises with n) rather than
    calling ``solve_power``, whose root finder fails to converge for large effects at small n. A power
    computation that raises a numerical error gives NaN and a note naming the error.
    """
    if not np.isfinite(effect_size) or effect_size <= 0:
        return math.nan, ""
    analysis, size_keyword = (TTestPower(), "nobs") if paired else (TTestIndPower(), "nobs1")

    def enough(n: int) -> bool:
        power = analysis.power(effect_size=effect_size, alpha=ALPHA, **{size_keyword: n})
        if not np.isfinite(power):
            # For large effects scipy's noncentral t returns NaN for the far (wrong-sign) rejection tail,
            # which is then negligible: the one-sided power at alpha / 2 is the two-sided power.
            power = analysis.power(
                effect_size=effect_size, alpha=ALPHA / 2, alternative="larger", **{size_keyword: n}
            )
        return power >= TARGET_POWER

    try:
        if enough(2):  # two seeds is the least a t test can use
            return 2.0, ""
        low, high = 2, 4
        while not enough(high):
            low, high = high, high * 2
            if high > 10**8:
                return math.nan, ""
        while high - low > 1:  # invariant: not enough(low), enough(high)
            middle = (low + high) // 2
            low, high = (low, middle) if enough(middle) else (middle, high)
    except NUMERICAL_ERRORS as error:
        return math.nan, f"power search failed ({type(error).__name__})"
    return float(high), ""


def seed_consistency(
    metrics: pd.DataFrame,
    runs: pd.DataFrame | None = None,
    metric: str = "accuracy",
    split: str = "test",
    stage: str = "final",
    delta: float = ONE_POINT,
) -> pd.DataFrame:
    """Per condition: spread across seeds and the seeds per arm needed to detect ``delta``.

    ``seeds_for_1pt`` assumes two independent arms with the observed standard deviation;
    ``seeds_for_1pt_paired`` uses the standard deviation of the seed-paired differences to the family's
    baseline (NaN for the baseline itself), which is what a paired design needs. Both are NaN when the
    standard deviation is zero or there are fewer than two runs, and NaN with a ``note`` when the power
    search fails numerically. ``delta`` is in the metric's unit (0.01 = one accuracy point).
    """
    selected = select_values(metrics, metric, split, stage)
    unit, _ = _metric_meta(selected)
    records = []
    baselines: dict[str, str | None] = {}
    source = runs if runs is not None else metrics
    for family in family_order(source):
        baselines[family] = baseline_variant(source, family)[0]
    for (family, variant), group in selected.groupby(["family", "variant"], sort=False):
        if str(group["family_kind"].iloc[0]) in SEED_CROSSING_KINDS:
            continue
        values = _by_seed(group)
        n = len(values)
        std = float(values.std(ddof=1)) if n > 1 else math.nan
        unpaired, note = _seeds_needed_noted(delta / std, paired=False) if n > 1 and std > 0 else (math.nan, "")
        notes = [f"unpaired: {note}"] if note else []
        paired_needed, paired_std = math.nan, math.nan
        baseline = baselines.get(family)
        if baseline and variant != baseline:
            base_values = _by_seed(
                selected[(selected["family"] == family) & (selected["variant"] == baseline)]
            )
            common = values.index.intersection(base_values.index)
            if len(common) >= 2:
                paired_std = float((values.loc[common] - base_values.loc[common]).std(ddof=1))
                if paired_std > 0:
                    paired_needed, note = _seeds_needed_noted(delta / paired_std, paired=True)
                    if note:
                        notes.append(f"paired: {note}")
        records.append(
            {
                "family": family,
                "family_kind": str(group["family_kind"].iloc[0]),
                "variant": variant,
                "metric": metric,
                "split": split,
                "stage": stage,
                "unit": unit,
                "n": n,
                "mean": float(values.mean()),
                "std": std,
                "min": float(values.min()),
                "max": float(values.max()),
                "range": float(values.max() - values.min()),
                "std_paired_diff": paired_std,
                "delta": delta,
                "seeds_for_1pt": unpaired,
                "seeds_for_1pt_paired": paired_needed,
                "note": "; ".join(notes),
            }
        )
    if not records:
        return pd.DataFrame(columns=SEED_CONSISTENCY_COLUMNS)  # e.g. a study of memory and time only
    return _order_like_input(pd.DataFrame(records), source).reindex(columns=SEED_CONSISTENCY_COLUMNS)


SEED_CONSISTENCY_COLUMNS = [
    "family", "family_kind", "variant", "metric", "split", "stage", "unit", "n", "mean", "std", "min", "max",
    "range", "std_paired_diff", "delta", "seeds_for_1pt", "seeds_for_1pt_paired", "note",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# Memory and time families


def memory_metric(metrics: pd.DataFrame, family: str) -> str | None:
    """The memory metric of a family: the first of ``MEMORY_TIME_MEMORY_METRICS`` with ok-run rows."""
    rows = _ok(metrics)
    rows = rows[(rows["family"] == family) & (rows["split"] == "none") & (rows["stage"] == "final")]
    recorded = set(rows["metric"])
    return next((m for m in MEMORY_TIME_MEMORY_METRICS if m in recorded), None)


def cost_metrics(metrics: pd.DataFrame, family: str) -> list[str]:
    """The cost metrics compared in a family of ``COST_FAMILY_KINDS``: memory metric, step time, then the kind's
    own (memory_time: tokens/s, base weights; lora_variants: adapter bytes, inference overhead and latency)."""
    memory = memory_metric(metrics, family)
    kinds = metrics.loc[metrics["family"] == family, "family_kind"]
    kind = str(kinds.iloc[0]) if len(kinds) else MEMORY_TIME_KIND
    others = COST_FAMILY_KINDS.get(kind, MEMORY_TIME_OTHER_METRICS)
    return ([memory] if memory else []) + [MEMORY_TIME_TIME_METRIC, *others]


def _cost_families(runs: pd.DataFrame) -> list[str]:
    if "family_kind" not in runs:
        return []
    return family_order(runs[runs["family_kind"].isin(list(COST_FAMILY_KINDS))])


def _memory_time_tests(
    metrics: pd.DataFrame, runs: pd.DataFrame, done: set[tuple[str, str]]
) -> list[pd.DataFrame]:
    """Cost comparisons of the families of ``COST_FAMILY_KINDS`` that ``TESTED_METRICS`` (``done``) did not
    already cover."""
    parts = []
    for family in _cost_families(runs):
        family_metrics = metrics[metrics["family"] == family]
        for metric in cost_metrics(metrics, family):
            if (metric, "none") not in done and _present(family_metrics, metric, "none", "final"):
                parts.append(compare_to_baseline(metrics, runs[runs["family"] == family], metric, "none"))
    return parts


# Run-table columns described in the cost summary: (output column, runs columns, first present wins).
COST_DESCRIPTION = (
    ("method", ("cfg.method.name", "method")),
    ("model", ("cfg.model.name",)),
    ("model_source", ("cfg.model.source",)),
    ("optimizer", ("cfg.train.optimizer",)),
    ("targets", ("cfg.method.lora.targets",)),
    ("seq_length", ("cfg.data.max_length",)),
    ("precision", ("cfg.train.precision",)),
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
IMPL_COLUMN = "cfg.method.impl"
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
    keys = [c for c in family_runs.columns if c.startswith("cfg.") and c not in (IMPL_COLUMN, "cfg.seed")]

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
    mine, theirs = _by_seed(rows[rows["variant"] == ours]), _by_seed(rows[rows["variant"] == peft])
    paired = len(mine) > 1 and list(mine.index) == list(theirs.index)
    ratio, low, high, _ = ratio_interval(mine.to_numpy(), theirs.to_numpy(), paired)
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
    for family in _cost_families(runs):
        family_runs = runs[runs["family"] == family]
        family_metrics = metrics[metrics["family"] == family]
        memory = memory_metric(metrics, family)
        twins = peft_counterparts(family_runs)
        impl = _impl(family_runs)
        summaries = {}
        for prefix, metric in COST_BLOCKS:
            metric = memory if prefix == "memory" else metric
            summaries[prefix] = (
                summarize(family_metrics, metric, "none").set_index("variant") if metric else pd.DataFrame()
            )
        for variant in dict.fromkeys(family_runs["variant"].tolist()):
            variant_runs = family_runs[family_runs["variant"] == variant]
            ok_runs = variant_runs[variant_runs["status"] == "ok"]
            described = ok_runs if len(ok_runs) else variant_runs
            record = {
                "family": family,
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


def as_text(value) -> str:
    """A setting as text: '' when missing, whole floats without '.0' (a NaN-padded int column: 512.0)."""
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return ""
    if isinstance(value, float) and value.is_integer():
        return str(int(value))
    return str(value)


# ----------------------------------------------------------------------------------------------------
# Files


def _present(metrics: pd.DataFrame, metric: str, split: str, stage: str) -> bool:
    return bool(
        ((metrics["metric"] == metric) & (metrics["split"] == split) & (metrics["stage"] == stage)).any()
    )


def all_tests(metrics: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """The tests table over every metric of ``TESTED_METRICS`` present in ``metrics``, plus the cost metrics
    of memory_time and lora_variants families (``cost_metrics``)."""
    parts = []
    for metric, split in TESTED_METRICS:
        if _present(metrics, metric, split, "final") or _present(metrics, metric, split, "epoch"):
            parts.append(compare_to_baseline(metrics, runs, metric, split))
    parts += _memory_time_tests(metrics, runs, set(TESTED_METRICS))
    parts = [p for p in parts if not p.empty]
    return pd.concat(parts, ignore_index=True) if parts else pd.DataFrame(columns=TESTS_COLUMNS)


def all_summaries(metrics: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Final-stage summaries of every metric and split, plus per-epoch summaries for epochs families."""
    final = _ok(metrics)
    final = final[final["stage"] == "final"]
    parts = [
        summarize(metrics, metric, split)
        for metric, split in dict.fromkeys(zip(final["metric"], final["split"], strict=True))
    ]
    epochs_families = runs.loc[runs["family_kind"].isin(["epochs", INSTRUCT_KIND]), "family"].unique()
    if len(epochs_families):
        per_epoch = metrics[metrics["family"].isin(epochs_families)]
        for metric, split in EPOCH_METRICS:
            if _present(per_epoch, metric, split, "epoch"):
                parts.append(summarize_epochs(per_epoch, metric, split))
    # Instruct families: the zero-shot evaluation (epoch 0) every result is a gain over.
    for metric, split in (("accuracy", "test"), ("accuracy", "validation"), ("loss", "test"), ("perplexity", "test")):
        if _present(metrics, metric, split, "zero_shot"):
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
    written = {}
    for name, table in tables.items():
        for suffix in (".parquet", ".csv"):
            path = out_dir / f"{name}{suffix}"
            write_table(table, path)
        written[name] = out_dir / f"{name}.parquet"
    return written

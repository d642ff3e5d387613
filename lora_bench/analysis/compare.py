"""Comparisons: each variant against its family's baseline, with effect sizes, ratios and Holm's correction.

The reference write-ups this suite reproduces report single runs; the point of this module is to say how much of a
difference between two settings survives seed-to-seed noise.

- **Tests** (``compare_to_baseline``): each non-baseline variant of a family against the family's
  baseline (``is_baseline`` in ``runs``). Runs that share a seed share data order and initialisation,
  so when both conditions have at least two seeds in common the comparison is *paired* on seed (only
  the common seeds are used): paired t test, with the Wilcoxon signed-rank test as the
  distribution-free check. Otherwise Welch's t test (no equal-variance assumption) and the
  Mann-Whitney U test. Holm's step-down correction is applied within each family (per metric and
  split), separately to the t tests and to the rank tests: a family is one question ("which of these
  variants differ from the baseline?"), and Holm controls the chance of any false claim in it.
  For families of kind ``epochs`` (``KindSpec.epoch_tests``) every epoch of a variant is compared with epoch 1 of
  the same variant (paired on seed, ``stage == "epoch"``).
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
  across seeds (exact byte counts) the interval is the ratio itself. For quantities positive by nature (times,
  bytes: ``POSITIVE_UNITS``) the interval is cut at 0: with 3 noisy seeds the normal model's set can reach below.
- **Convergence**: a comparison resting on a run whose training did not converge (``lora_bench.run.diagnostics``)
  is ``inconclusive``; one whose variant declares ``expect: no_learning`` is ``as_expected``.

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
detectable_diff        the smallest difference the same test (its standard error and df, alpha 0.05 before
                       Holm) finds with power 0.8 (``summary.detectable_difference``): what an n.s. rules out
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

import numpy as np
import pandas as pd
from scipy import optimize, stats

from lora_bench.analysis.summary import (
    ALPHA,
    CONFIDENCE,
    NUMERICAL_ERRORS,
    by_seed,
    detectable_difference,
    family_order,
    metric_meta,
    select_values,
)
from lora_bench.study import kind_spec

# Units whose values are deterministic by construction, so that identical runs mean an exact value.
EXACT_UNITS = ("bytes", "count")
# Units of quantities positive by nature, whose ratio intervals are cut at 0 (not accuracy: its gain can be negative).
POSITIVE_UNITS = ("s", "1/s", "bytes", "count", "nats", "ratio")
TESTS_COLUMNS = [
    "family", "family_kind", "metric", "split", "stage", "variant", "baseline", "unit", "higher_is_better",
    "n_variant", "n_baseline", "n_pairs", "paired", "mean_variant", "mean_baseline", "diff", "diff_ci_low",
    "diff_ci_high", "detectable_diff", "ratio", "ratio_ci_low", "ratio_ci_high", "effect_size", "effect_size_kind",
    "effect_ci_low", "effect_ci_high", "test", "p_value", "p_holm", "nonparametric_test", "p_nonparametric",
    "p_nonparametric_holm", "exact", "significant", "direction", "verdict", "untrained_variant", "untrained_baseline",
    "convergence", "note",
]  # fmt: skip


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


def ratio_interval(variant: np.ndarray, baseline: np.ndarray, paired: bool,
                   positive: bool = False) -> tuple[float, float, float, str]:
    """``mean(variant) / mean(baseline)`` with its 95 % Fieller interval: ``(ratio, low, high, note)``.

    ``positive``: both quantities are positive by nature (``POSITIVE_UNITS``), so the interval is cut at 0.

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
        ratio, low, high, note = _fieller(ratio, a, c, s_aa, s_cc, s_ac, df)
        if positive and np.isfinite(low) and low < 0:
            # The normal model behind Fieller allows negative means; a ratio of two quantities positive by nature
            # (times, bytes) cannot be negative, and cutting the set at 0 keeps its coverage.
            low = 0.0
        return ratio, low, high, note
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
        "detectable_diff": math.nan,
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


def compare_two(variant: pd.Series, baseline: pd.Series, positive: bool = False) -> dict:
    """Compare two conditions given as values indexed by seed; paired when they share >= 2 seeds.

    ``positive``: the values are positive by nature (``POSITIVE_UNITS``): the ratio interval is cut at 0."""
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

    compare = _paired if len(common) >= 2 else _unpaired
    ratio = compare(variant, baseline, common, result, notes, positive)
    if np.isfinite(result["effect_size"]) and not (
        np.isfinite(result["effect_ci_low"]) and np.isfinite(result["effect_ci_high"])
    ):
        notes.append("effect-size interval not computable (noncentral-t root search failed)")
    result["ratio"], result["ratio_ci_low"], result["ratio_ci_high"] = ratio[:3]
    notes.append(ratio[3])
    result["note"] = "; ".join(n for n in notes if n)
    return result


def _paired(variant: pd.Series, baseline: pd.Series, common: pd.Index, result: dict, notes: list[str],
            positive: bool = False) -> tuple:
    """The paired tests of ``compare_two`` on the common seeds, into ``result``; returns the ratio interval."""
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
        n = len(differences)
        result["detectable_diff"] = detectable_difference(float(np.std(differences, ddof=1)) / math.sqrt(n), n - 1)
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
    return ratio_interval(v, b, paired=True, positive=positive)


def _unpaired(variant: pd.Series, baseline: pd.Series, common: pd.Index, result: dict, notes: list[str],
              positive: bool = False) -> tuple:
    """Welch's and the Mann-Whitney U test of ``compare_two``, into ``result``; returns the ratio interval."""
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
        result["detectable_diff"] = detectable_difference(*_welch_se_df(v, b))
    try:
        result["p_nonparametric"] = float(stats.mannwhitneyu(v, b, alternative="two-sided").pvalue)
    except NUMERICAL_ERRORS as error:
        notes.append(f"Mann-Whitney U test failed ({type(error).__name__})")
    result["effect_size"], result["effect_ci_low"], result["effect_ci_high"] = cohens_d(v, b)
    return ratio_interval(v, b, paired=False, positive=positive)


def _welch_se_df(v: np.ndarray, b: np.ndarray) -> tuple[float, float]:
    """Standard error of the difference of two means and its Welch-Satterthwaite degrees of freedom."""
    a, c = np.var(v, ddof=1) / len(v), np.var(b, ddof=1) / len(b)
    denominator = a**2 / (len(v) - 1) + c**2 / (len(b) - 1)
    return math.sqrt(a + c), ((a + c) ** 2 / denominator if denominator > 0 else math.nan)


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


def holm(p_values: pd.Series) -> pd.Series:
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
        tests.loc[index, "p_holm"] = holm(tests.loc[index, "p_value"]).to_numpy()
        tests.loc[index, "p_nonparametric_holm"] = holm(tests.loc[index, "p_nonparametric"]).to_numpy()
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

    Families whose kind compares epochs (``KindSpec.epoch_tests``) compare every epoch with epoch 1 of the same
    variant instead (always on the ``stage == "epoch"`` rows); kinds without baseline tests are left out. See the
    module docstring for the columns.
    """
    rows: list[dict] = []
    everywhere = select_values(metrics, metric, split, stage)
    for family in family_order(runs):
        family_runs = runs[runs["family"] == family]
        kind = str(family_runs["family_kind"].iloc[0])
        spec = kind_spec(kind)
        if spec.epoch_tests:
            rows.extend(_compare_epochs(metrics, runs, family, kind, metric, split))
        elif spec.baseline_tests:
            rows.extend(_compare_family(everywhere, runs, family, kind, dict(metric=metric, split=split, stage=stage)))
    return _finish(rows)


def _compare_family(everywhere: pd.DataFrame, runs: pd.DataFrame, family: str, kind: str, what: dict) -> list[dict]:
    """Rows of ``compare_to_baseline`` for one family: each variant against the baseline on ``everywhere`` (the
    ok-run rows of the metric, split and stage named in ``what``, over all families)."""
    family_runs = runs[runs["family"] == family]
    selected = everywhere[everywhere["family"] == family]
    has_ok_runs = bool((family_runs["status"] == "ok").any()) if "status" in family_runs else True
    if everywhere.empty or (selected.empty and (has_ok_runs or kind_spec(kind).cost_only)):
        # The metric was not recorded for this family (e.g. GPU memory on a CPU run): nothing to say.
        # A family whose runs all failed still gets its rows, so the report can say so; not a family that only
        # measures cost, which may never evaluate accuracy: its cost summary lists the failures.
        return []
    unit, higher = metric_meta(everywhere)
    baseline, baseline_note = baseline_variant(runs, family)
    rows = []
    for variant in dict.fromkeys(family_runs["variant"].tolist()):
        if variant == baseline:
            continue
        values = by_seed(selected[selected["variant"] == variant])
        base_values = by_seed(selected[selected["variant"] == baseline]) if baseline else pd.Series(dtype=float)
        comparison = compare_two(values, base_values, unit in POSITIVE_UNITS) if baseline else _nan_comparison()
        exact = unit in EXACT_UNITS and _exact_difference(values, base_values)
        notes = [baseline_note, comparison.get("note", "")]
        if exact:
            notes.append("exact: every run of both conditions gave the same value, so there is nothing to test")
        notes += [_failed_note(runs, family, variant), _failed_note(runs, family, baseline) if baseline else ""]
        comparison.update(
            family=family,
            family_kind=kind,
            **what,
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
    return rows


def _compare_epochs(
    metrics: pd.DataFrame, runs: pd.DataFrame, family: str, kind: str, metric: str, split: str
) -> list[dict]:
    selected = select_values(metrics, metric, split, "epoch")
    selected = selected[selected["family"] == family]
    if selected.empty:
        return []
    unit, higher = metric_meta(selected)
    rows = []
    for variant in dict.fromkeys(runs[runs["family"] == family]["variant"].tolist()):
        per_variant = selected[selected["variant"] == variant]
        if per_variant.empty:
            continue
        first = by_seed(per_variant[per_variant["epoch"] == 1])
        for epoch in sorted(int(e) for e in per_variant["epoch"].unique() if int(e) != 1):
            later = by_seed(per_variant[per_variant["epoch"] == epoch])
            comparison = compare_two(later, first, unit in POSITIVE_UNITS)
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
# Published numbers


def welch_from_summary(
    mean: float, std: float, n: int, other_mean: float, other_std: float, other_n: int
) -> float:
    """Two-sided Welch t-test p-value from summary statistics (for references that report mean +- std)."""
    if n < 2 or other_n < 2 or not (np.isfinite(std) and np.isfinite(other_std)) or std == other_std == 0:
        return math.nan
    return float(
        stats.ttest_ind_from_stats(mean, std, n, other_mean, other_std, other_n, equal_var=False).pvalue
    )

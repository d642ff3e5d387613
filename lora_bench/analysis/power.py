"""Seed power: how noisy each condition is, and how many seeds a study would need.

- **Seed consistency** (``seed_consistency``): how noisy each condition is, and how many seeds per
  arm a study would need to detect a one-point (0.01) accuracy difference with power 0.8 at
  alpha 0.05 (``statsmodels.stats.power``), unpaired and, against the baseline, paired.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
from statsmodels.stats.power import TTestIndPower, TTestPower

from lora_bench.analysis.compare import baseline_variant
from lora_bench.analysis.summary import (
    ALPHA,
    NUMERICAL_ERRORS,
    TARGET_POWER,
    by_seed,
    family_order,
    metric_meta,
    order_like_input,
    select_values,
)
from lora_bench.study import kind_spec

# One accuracy point: the smallest difference the reference write-ups discuss.
ONE_POINT = 0.01


def seeds_needed_noted(effect_size: float, paired: bool) -> tuple[float, str]:
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
    unit, _ = metric_meta(selected)
    records = []
    baselines: dict[str, str | None] = {}
    source = runs if runs is not None else metrics
    for family in family_order(source):
        baselines[family] = baseline_variant(source, family)[0]
    for (family, variant), group in selected.groupby(["family", "variant"], sort=False):
        if not kind_spec(str(group["family_kind"].iloc[0])).baseline_tests:
            continue
        values = by_seed(group)
        n = len(values)
        std = float(values.std(ddof=1)) if n > 1 else math.nan
        unpaired, note = seeds_needed_noted(delta / std, paired=False) if n > 1 and std > 0 else (math.nan, "")
        notes = [f"unpaired: {note}"] if note else []
        paired_needed, paired_std = math.nan, math.nan
        baseline = baselines.get(family)
        if baseline and variant != baseline:
            base_values = by_seed(selected[(selected["family"] == family) & (selected["variant"] == baseline)])
            paired_needed, paired_std, note = _paired_seeds(values, base_values, delta)
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
    return order_like_input(pd.DataFrame(records), source).reindex(columns=SEED_CONSISTENCY_COLUMNS)


def _paired_seeds(values: pd.Series, base_values: pd.Series, delta: float) -> tuple[float, float, str]:
    """(seeds needed, standard deviation of the seed-paired differences, note) of a variant against its baseline;
    NaN without two common seeds or with differences that do not vary."""
    common = values.index.intersection(base_values.index)
    if len(common) < 2:
        return math.nan, math.nan, ""
    paired_std = float((values.loc[common] - base_values.loc[common]).std(ddof=1))
    if not paired_std > 0:
        return math.nan, paired_std, ""
    needed, note = seeds_needed_noted(delta / paired_std, paired=True)
    return needed, paired_std, note


SEED_CONSISTENCY_COLUMNS = [
    "family", "family_kind", "variant", "metric", "split", "stage", "unit", "n", "mean", "std", "min", "max",
    "range", "std_paired_diff", "delta", "seeds_for_1pt", "seeds_for_1pt_paired", "note",
]  # fmt: skip

"""Item-level statistics: every variant against its family's baseline on the same examples and seeds.

A run's test accuracy is the mean of one 0/1 outcome per test example (``predictions.parquet``). For a variant
and its baseline, ``d[s, i] = correct_variant[s, i] - correct_baseline[s, i]`` for seed ``s`` and example ``i``
is a crossed array: seeds and examples are both samples (of training randomness, and of the sentences the task
could have asked), and the question "does the variant beat the baseline?" is about both populations. This
module analyses it with the crossed random-effects model

    d[s, i] = D + a[s] + b[i] + e[s, i],   a ~ (0, s2_seed), b ~ (0, s2_item), e ~ (0, s2_resid)

fitted by **moments** (the two-way ANOVA of the k x m array: MS_seed, MS_item, MS_resid; components
truncated at 0, as ``analysis.variance`` does for its ANOVA fallback), so that

    Var(mean d) = s2_seed / k + s2_item / m + s2_resid / (k m) = (MS_seed + MS_item - MS_resid) / (k m)

with Satterthwaite's degrees of freedom for the combination of mean squares actually used. MS_seed is always
in it (never pooled into MS_resid when its F test fails, a rule that made the test liberal with 2-5 seeds), so
the variance is never below the seed-level paired t test's, MS_seed / (k m); the item term is dropped only when
its estimate is negative. The test is the t
test of D = 0 on that variance ("crossed items x seeds t"); the 95 % interval is its t interval. Why this
model rather than the alternatives the issue named:

- **A two-way (pigeonhole) bootstrap** resamples seeds with replacement: with 2-5 seeds it sees (k-1)/k of
  the seed variance and no t quantile, while it counts the residual about three times (Owen 2007); in our
  calibration simulations (``calibrate``) neither error cancels the other, so its false-positive rate depends
  on which component dominates. The moment estimator is unbiased for each component and its t reference
  takes the few seeds into account.
- **A logistic mixed model** with crossed random effects is the textbook choice for 0/1 outcomes, but needs
  an iterative fit per comparison (seconds each, with convergence failures at 2-3 seeds) and its Wald test
  has no small-sample degrees of freedom; on accuracy differences of a few points the linear model's mean is
  the difference in accuracy itself, which is the quantity reported.

The calibration (``calibrate``; tests/test_items.py) plants item-level effects (and none) in simulated
predictions with per-item difficulty, method x item and method x seed effects, and checks the false-positive
rate at alpha 0.05 stays within [0.03, 0.07]. What the item-level test buys, and what it does not: the
seed-level paired t test already pairs on items (a difference of two accuracies on the same test set), but it
treats the test set as fixed; when a variant wins or loses on particular examples (method x item effects)
its false-positive rate for "the variant is better on the task" exceeds 0.05, and the item-level test's does
not. The item-level test's degrees of freedom come from the examples when the item component dominates, so
with few seeds its t quantile is small; but its variance includes s2_item / m, which more seeds cannot
reduce: ``seeds_needed`` is infinite when one point is within that floor (more test examples are needed).

**Splits.** A comparison pairs only runs on the same data split (``data_seed``) and the same examples
(``data_key`` and ``example_id``): within each data seed the seeds both conditions share and the examples all
its runs scored form one k x m array; the strata are combined by weights k m (variance and sweep families
vary the split). A stratum with fewer than two shared seeds cannot estimate s2_seed and is left out (noted).

**McNemar** (``item_pairs``): for every seed pair, the exact test of the discordant examples (variant right
and baseline wrong vs the reverse: two-sided binomial test with p = 1/2). It is conditional on that seed
pair, so it says whether *these two runs* differ, not whether the methods do.

**Ranks** (``item_ranks``): per family, all conditions on their common seeds and examples; P(rank = r) from a
two-way bootstrap (seeds resampled within each stratum, examples resampled within each stratum, the same
draws for every condition, ``RANK_RESAMPLES``), which is descriptive; the *tie groups* come from the crossed
test of every pair of conditions, Holm-corrected over the family's pairs: conditions sorted by mean accuracy,
and each letter marks a maximal run of consecutive conditions with no significant difference between any two.

**Accuracy intervals** (``item_summary``): the same crossed model on each condition's 0/1 outcomes, on the
logit scale (delta method) and transformed back, so an interval of an accuracy stays inside [0, 1].

Output tables (parquet + CSV; ``*_COLUMNS`` below, docs/tables.md): ``item_tests``, ``item_pairs``,
``item_ranks``, ``item_summary``; and ``seed_consistency`` gains ``seeds_for_1pt_items``.
"""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas as pd
from scipy import stats as scipy_stats

from lora_bench.analysis.compare import holm
from lora_bench.analysis.power import ONE_POINT, seeds_needed_noted
from lora_bench.analysis.summary import ALPHA, CONFIDENCE, TARGET_POWER, detectable_difference, family_order
from lora_bench.atomic import write_named_tables
from lora_bench.study import kind_spec

SPLIT = "test"
RANK_RESAMPLES = 2000
RANK_SEED = 20240607
MAX_SEEDS = 10_000
ITEM_TEST = "crossed items x seeds t"

ITEM_TESTS_COLUMNS = [
    "family", "family_kind", "metric", "split", "variant", "baseline", "n_seeds", "n_items", "n_strata", "design",
    "mean_variant", "mean_baseline", "diff", "diff_ci_low", "diff_ci_high", "detectable_diff", "se", "df", "test",
    "p_value", "p_holm",
    "significant", "direction", "verdict", "sd_seed", "sd_item", "sd_residual", "n_discordant", "note",
]  # fmt: skip
ITEM_PAIRS_COLUMNS = [
    "family", "family_kind", "split", "variant", "baseline", "data_seed", "train_seed", "n_items", "both_correct",
    "variant_only", "baseline_only", "both_wrong", "diff", "p_mcnemar",
]  # fmt: skip
ITEM_RANKS_COLUMNS = [
    "family", "family_kind", "split", "variant", "is_baseline", "n_seeds", "n_items", "mean", "mean_rank",
    "p_rank1", "tie_group", "rank", "probability",
]  # fmt: skip
ITEM_SUMMARY_COLUMNS = [
    "family", "family_kind", "variant", "split", "n_seeds", "n_items", "design", "mean", "ci_low", "ci_high",
    "ci_method", "se", "df",
]  # fmt: skip


# ----------------------------------------------------------------------------------------------------
# The crossed model


def crossed_moments(d: np.ndarray) -> dict[str, np.ndarray]:
    """Mean and the moment fit of the crossed model for arrays ``d`` of shape (..., k seeds, m items).

    Vectorised over the leading axes (the calibration fits thousands of simulated arrays at once). Returns the
    mean, the variance of the mean, Satterthwaite's df and the three components (truncated at 0).
    """
    d = np.asarray(d, dtype=float)
    k, m = d.shape[-2:]
    grand = d.mean(axis=(-2, -1))
    row, col = d.mean(axis=-1), d.mean(axis=-2)
    ss_seed = m * ((row - grand[..., None]) ** 2).sum(-1)
    ss_item = k * ((col - grand[..., None]) ** 2).sum(-1)
    ss_total = ((d - grand[..., None, None]) ** 2).sum(axis=(-2, -1))
    df_s, df_i, df_e = k - 1, m - 1, (k - 1) * (m - 1)
    with np.errstate(invalid="ignore", divide="ignore"):
        ms_s, ms_i = ss_seed / df_s, ss_item / df_i
        ms_e = np.maximum(ss_total - ss_seed - ss_item, 0.0) / df_e
    s2_seed = np.maximum(0.0, (ms_s - ms_e) / m)
    s2_item = np.maximum(0.0, (ms_i - ms_e) / k)
    # Var(mean) = (MS_seed + c_i (MS_item - MS_resid)) / (k m): MS_seed / (k m) alone is the seed-level paired t
    # test's variance (the examples fixed), the item term adds the examples as a sample. MS_seed is always kept:
    # pooling it into MS_resid when its F test is not significant ("sometimes pool") lends the test the
    # residual's hundreds of df, and with 2-5 seeds that F test misses seed shifts of 2-3 points often enough
    # to lift the false-positive rate to 0.08-0.14 (``calibrate``, "large seed effects").
    c_i = (s2_item > 0).astype(float)
    combined = ms_s + c_i * (ms_i - ms_e)
    with np.errstate(invalid="ignore", divide="ignore"):
        denominator = ms_s**2 / df_s + c_i * (ms_i**2 / df_i + ms_e**2 / df_e)
        df = np.where(denominator > 0, combined**2 / denominator, np.nan)
    return {"mean": grand, "var": combined / (k * m), "df": df, "s2_seed": s2_seed, "s2_item": s2_item,
            "s2_resid": ms_e, "k": k, "m": m}


def combine_strata(fits: list[dict]) -> dict:
    """One estimate from independent strata (data splits): weights k m, Satterthwaite df of the sum."""
    weights = np.array([f["k"] * f["m"] for f in fits], dtype=float)
    weights /= weights.sum()
    mean = float(sum(w * f["mean"] for w, f in zip(weights, fits)))
    parts = [w**2 * float(f["var"]) for w, f in zip(weights, fits)]
    var = float(sum(parts))
    denominator = sum(p**2 / float(f["df"]) for p, f in zip(parts, fits) if p > 0 and np.isfinite(f["df"]))
    df = var**2 / denominator if denominator > 0 else math.nan
    pooled = {name: float(np.average([float(f[name]) for f in fits], weights=weights))
              for name in ("s2_seed", "s2_item", "s2_resid")}
    return {"mean": mean, "var": var, "df": df, **pooled, "k": sum(f["k"] for f in fits),
            "m": sum(f["m"] for f in fits), "strata": len(fits)}


def t_result(fit: dict) -> dict:
    """Difference, its 95 % t interval, standard error, df, two-sided p and the smallest difference detected
    with power 0.8 (``detectable_diff``) of a (combined) fit."""
    mean, var, df = float(fit["mean"]), float(fit["var"]), float(fit["df"])
    if not (var > 0 and np.isfinite(df)):
        return {"diff": mean, "diff_ci_low": mean if var == 0 else math.nan,
                "diff_ci_high": mean if var == 0 else math.nan, "se": math.sqrt(max(var, 0.0)), "df": df,
                "p_value": math.nan}
    se = math.sqrt(var)
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, df)) * se
    return {"diff": mean, "diff_ci_low": mean - half, "diff_ci_high": mean + half, "se": se, "df": df,
            "p_value": float(2 * scipy_stats.t.sf(abs(mean) / se, df)),
            "detectable_diff": detectable_difference(se, df)}


def seeds_needed(s2_seed: float, s2_item: float, s2_resid: float, m: int, delta: float = ONE_POINT,
                 power: float = TARGET_POWER, alpha: float = ALPHA) -> float:
    """Seeds (paired runs per condition) for the crossed test to detect ``delta`` with ``power`` on ``m`` items.

    Power with the t quantile at the df the fit would have at k seeds (expected mean squares) and a normal
    approximation of the noncentral t. Infinite when
    the item floor s2_item / m alone leaves less power than asked: then more test examples are needed, not seeds.
    """
    if not all(np.isfinite([s2_seed, s2_item, s2_resid])) or s2_seed + s2_item + s2_resid <= 0:
        return math.nan
    floor = s2_item / m
    if floor > 0 and delta / math.sqrt(floor) <= scipy_stats.norm.ppf(1 - alpha / 2) + scipy_stats.norm.ppf(power):
        return math.inf

    def enough(k: int) -> bool:
        ms_s, ms_i, ms_e = s2_resid + m * s2_seed, s2_resid + k * s2_item, s2_resid
        c_i = float(s2_item > 0)
        combined = ms_s + c_i * (ms_i - ms_e)
        df = combined**2 / (ms_s**2 / (k - 1) + c_i * (ms_i**2 / (m - 1) + ms_e**2 / ((k - 1) * (m - 1))))
        ncp = delta / math.sqrt(combined / (k * m))
        critical = scipy_stats.t.ppf(1 - alpha / 2, df)
        # Normal approximation of the noncentral t beyond the t quantile (scipy's nct is unstable at df ~ 1e5).
        return scipy_stats.norm.cdf(ncp - critical) + scipy_stats.norm.cdf(-ncp - critical) >= power

    if not enough(MAX_SEEDS):
        return math.inf
    low, high = 1, MAX_SEEDS  # power rises with k: enough(high), and low is below any answer
    while high - low > 1:
        middle = (low + high) // 2
        low, high = (low, middle) if enough(middle) else (middle, high)
    return float(high)


def mcnemar_exact(variant_only: int, baseline_only: int) -> float:
    """Two-sided exact McNemar p-value: the binomial test of the discordant counts against p = 1/2."""
    n = int(variant_only) + int(baseline_only)
    if n == 0:
        return 1.0
    return float(scipy_stats.binomtest(int(variant_only), n, 0.5).pvalue)


# ----------------------------------------------------------------------------------------------------
# From the predictions table to crossed arrays


def _conditions(runs: pd.DataFrame, family: str) -> tuple[str, list[str], str | None]:
    """(column naming the conditions, the conditions in config order, the baseline condition)."""
    family_runs = runs[runs["family"] == family]
    kind = str(family_runs["family_kind"].iloc[0])
    # Variants that expand a setting over data seeds are compared by ``setting`` (KindSpec.setting_column).
    column = kind_spec(kind).setting_column
    column = column if column in family_runs else "variant"
    baseline_rows = family_runs[family_runs["is_baseline"].astype(bool)]
    baseline = str(baseline_rows[column].iloc[0]) if len(baseline_rows) else None
    return column, [str(c) for c in dict.fromkeys(family_runs[column].tolist())], baseline


def crossed_arrays(predictions: pd.DataFrame, column: str, conditions: list[str]) -> list[dict]:
    """Per stratum (data_key, data_seed): the train seeds every condition has, the examples every such run
    scored, and each condition's 0/1 array (k x m). Strata with fewer than one shared seed are left out."""
    frame = predictions[predictions[column].isin(conditions)]
    strata = []
    for (key, data_seed), stratum in frame.groupby(["data_key", "data_seed"], sort=True):
        seeds = None
        for condition in conditions:
            have = set(stratum.loc[stratum[column] == condition, "train_seed"].tolist())
            seeds = have if seeds is None else seeds & have
        seeds = sorted(seeds or [])
        if not seeds:
            continue
        used = stratum[stratum["train_seed"].isin(seeds)]
        runs_per_item = used.groupby("example_id")["run_id"].nunique()
        items = np.sort(runs_per_item.index[runs_per_item == used["run_id"].nunique()].to_numpy())
        if not len(items):
            continue
        arrays = {}
        for condition in conditions:
            rows = used[(used[column] == condition) & used["example_id"].isin(items)]
            # A duplicated (seed, example) of one condition (two variants that share a setting) keeps its mean.
            table = rows.pivot_table(index="train_seed", columns="example_id", values="correct", aggfunc="mean")
            arrays[condition] = table.reindex(index=seeds, columns=items).to_numpy(dtype=float)
        strata.append({"data_key": key, "data_seed": int(data_seed), "seeds": seeds, "items": items,
                       "arrays": arrays})
    return strata


def _pair_fit(strata: list[dict], a: str, b: str) -> tuple[dict | None, str]:
    fits, notes = [], []
    for stratum in strata:
        if len(stratum["seeds"]) < 2:
            notes.append(f"data seed {stratum['data_seed']}: {len(stratum['seeds'])} shared seed (needs 2)")
            continue
        fit = crossed_moments(stratum["arrays"][a] - stratum["arrays"][b])
        fits.append({**{k: (float(v) if np.ndim(v) == 0 else v) for k, v in fit.items()}})
    return (combine_strata(fits) if fits else None), "; ".join(notes)


def _crossed_pair(predictions: pd.DataFrame, column: str, a: str, b: str) -> tuple[list[dict], dict | None, str]:
    """The strata of conditions ``a`` and ``b`` and their pooled crossed fit (None when no stratum has two
    shared seeds), with a note on the strata left out: the one computation behind ``item_tests`` and
    ``item_comparison``."""
    strata = crossed_arrays(predictions, column, [a, b])
    fit, note = _pair_fit(strata, a, b)
    return strata, fit, note


def _design(fit: dict | None, strata: list[dict]) -> str:
    if fit is None:
        return ""
    used = [s for s in strata if len(s["seeds"]) >= 2]
    if len(used) == 1:
        return f"{len(used[0]['seeds'])} seeds x {len(used[0]['items'])} items"
    return " + ".join(f"{len(s['seeds'])} x {len(s['items'])}" for s in used) + " (seeds x items per data seed)"


# ----------------------------------------------------------------------------------------------------
# Tables


def _families(runs: pd.DataFrame) -> list[tuple[str, str]]:
    """(family, kind) of the families whose variants are compared item by item (``KindSpec.item_level``): not
    epochs families, which compare epochs of one variant (``_epoch_pairs``), tune families, which only choose a
    value, nor memory_time families, which measure cost."""
    return [(f, _kind(runs, f)) for f in family_order(runs) if kind_spec(_kind(runs, f)).item_level]


def _kind(runs: pd.DataFrame, family: str) -> str:
    return str(runs.loc[runs["family"] == family, "family_kind"].iloc[0])


def _pairs_with_baseline(predictions: pd.DataFrame, runs: pd.DataFrame, split: str):
    """(family, kind, condition column, condition, baseline, the family's predictions on ``split``) for every
    condition of an item-level family that has a baseline and predictions (the selected epochs', stage
    ``final``), and every epoch after the first of an epochs family against its first (stage ``epoch``)."""
    selected = predictions[predictions["split"] == split]
    final = stage_rows(selected, "final")
    for family, kind in _families(runs):
        column, conditions, baseline = _conditions(runs, family)
        family_predictions = final[final["family"] == family]
        if baseline is None or family_predictions.empty:
            continue
        for variant in conditions:
            if variant != baseline:
                yield family, kind, column, variant, baseline, family_predictions
    by_epoch = stage_rows(selected, "epoch")
    for family in family_order(runs):
        kind = _kind(runs, family)
        if kind_spec(kind).epoch_tests:
            yield from _epoch_pairs(by_epoch, runs, family, kind)


EPOCH_CONDITION = "condition"


def epoch_condition(variant: str, epoch: int) -> str:
    """``<variant>@epoch<k>``: an epoch of a variant as a condition, named as in the seed-level tests table."""
    return f"{variant}@epoch{epoch}"


def epoch_conditions(epoch_predictions: pd.DataFrame) -> pd.DataFrame:
    """Stage-``epoch`` predictions with each (variant, epoch) as a condition of its own (column
    ``EPOCH_CONDITION``), so ``crossed_arrays`` and ``item_comparison`` compare epochs of the same runs."""
    names = [epoch_condition(variant, epoch) for variant, epoch in
             zip(epoch_predictions["variant"].astype(str), epoch_predictions["epoch"].astype(int))]
    return epoch_predictions.assign(**{EPOCH_CONDITION: names})


def _epoch_pairs(epoch_predictions: pd.DataFrame, runs: pd.DataFrame, family: str, kind: str):
    """Each later epoch of each variant of an epochs family against its epoch 1, on the test answers its runs
    kept after every epoch."""
    rows = epoch_predictions[epoch_predictions["family"] == family]
    if rows.empty:
        return
    rows = epoch_conditions(rows)
    for variant in dict.fromkeys(runs.loc[runs["family"] == family, "variant"].astype(str)):
        epochs = sorted(int(e) for e in rows.loc[rows["variant"] == variant, "epoch"].unique())
        if 1 not in epochs:
            continue
        for epoch in (e for e in epochs if e != 1):
            yield family, kind, EPOCH_CONDITION, epoch_condition(variant, epoch), epoch_condition(variant, 1), rows


def item_tests(predictions: pd.DataFrame, runs: pd.DataFrame, split: str = SPLIT) -> pd.DataFrame:
    """Every condition against its family's baseline by the crossed test (one row each; Holm within family)."""
    rows = []
    for family, kind, column, variant, baseline, family_predictions in _pairs_with_baseline(predictions, runs, split):
        strata, fit, note = _crossed_pair(family_predictions, column, variant, baseline)
        row = {"family": family, "family_kind": kind, "metric": "accuracy", "split": split, "variant": variant,
               "baseline": baseline, "test": ITEM_TEST, "n_strata": 0, "n_seeds": 0, "n_items": 0}
        if fit is None:
            row["note"] = note or "no shared seeds and examples"
            rows.append(row)
            continue
        used = [s for s in strata if len(s["seeds"]) >= 2]
        v = np.concatenate([s["arrays"][variant].ravel() for s in used])
        b = np.concatenate([s["arrays"][baseline].ravel() for s in used])
        row.update(t_result(fit), n_strata=fit["strata"], n_seeds=int(fit["k"]), n_items=int(fit["m"]),
                   design=_design(fit, strata), mean_variant=float(v.mean()), mean_baseline=float(b.mean()),
                   sd_seed=math.sqrt(fit["s2_seed"]), sd_item=math.sqrt(fit["s2_item"]),
                   sd_residual=math.sqrt(fit["s2_resid"]), n_discordant=int((v != b).sum()),
                   note=note if note else ("" if fit["var"] > 0 else "every pair of runs agrees on every example"))
        rows.append(row)
    tests = pd.DataFrame(rows).reindex(columns=ITEM_TESTS_COLUMNS)
    if tests.empty:
        return tests
    for index in tests.groupby(["family", "split"], sort=False).groups.values():
        tests.loc[index, "p_holm"] = holm(tests.loc[index, "p_value"]).to_numpy()
    tests["significant"] = (tests["p_holm"] < ALPHA).fillna(False).astype(bool)
    tests["direction"] = np.where(tests["significant"], np.where(tests["diff"] > 0, "higher", "lower"), "n.s.")
    tests["verdict"] = np.where(tests["significant"], np.where(tests["diff"] > 0, "better", "worse"), "n.s.")
    for column in ("n_seeds", "n_items", "n_strata", "n_discordant"):
        tests[column] = tests[column].fillna(0).astype(int)
    tests["note"] = tests["note"].fillna("")
    tests["design"] = tests["design"].fillna("")
    return tests


def item_comparison(predictions: pd.DataFrame, runs: pd.DataFrame, family: str, a: str, b: str,
                    split: str = SPLIT, column: str | None = None) -> dict | None:
    """The crossed items x seeds test of condition ``a`` minus condition ``b`` of one family, any two of its
    conditions (``item_tests`` compares each with the baseline; the instruct claims compare other pairs too):
    ``t_result``'s columns with ``design`` and ``note``; None when the two share no two seeds and examples.
    ``column`` names the conditions (default: the family's, ``variant`` or ``setting``); the epochs of one run
    are compared through a column naming each epoch."""
    selected = predictions[(predictions["split"] == split) & (predictions["family"] == family)] \
        if len(predictions) else predictions
    if selected.empty:
        return None
    column = column or _conditions(runs, family)[0]
    strata, fit, note = _crossed_pair(selected, column, a, b)
    if fit is None:
        return None
    return {**t_result(fit), "design": _design(fit, strata), "note": note}


def item_pairs(predictions: pd.DataFrame, runs: pd.DataFrame, split: str = SPLIT) -> pd.DataFrame:
    """McNemar's exact test for every seed pair (same data seed and train seed) of a condition and its baseline."""
    rows = []
    for family, kind, column, variant, baseline, family_predictions in _pairs_with_baseline(predictions, runs, split):
        for stratum in crossed_arrays(family_predictions, column, [variant, baseline]):
            for index, seed in enumerate(stratum["seeds"]):
                v, b = stratum["arrays"][variant][index], stratum["arrays"][baseline][index]
                v_only, b_only = int(((v == 1) & (b == 0)).sum()), int(((v == 0) & (b == 1)).sum())
                rows.append({"family": family, "family_kind": kind, "split": split, "variant": variant,
                             "baseline": baseline, "data_seed": stratum["data_seed"], "train_seed": int(seed),
                             "n_items": len(v), "both_correct": int(((v == 1) & (b == 1)).sum()),
                             "variant_only": v_only, "baseline_only": b_only,
                             "both_wrong": int(((v == 0) & (b == 0)).sum()), "diff": float((v - b).mean()),
                             "p_mcnemar": mcnemar_exact(v_only, b_only)})
    return pd.DataFrame(rows, columns=ITEM_PAIRS_COLUMNS)


def tie_groups(names: list[str], means: np.ndarray, significant: dict[frozenset, bool]) -> dict[str, str]:
    """Letters of the maximal runs of consecutive conditions (by mean, best first) that are pairwise tied."""
    order = [names[i] for i in np.argsort(-np.asarray(means), kind="stable")]
    runs_found: list[tuple[int, int]] = []
    for start in range(len(order)):
        end = start
        while end + 1 < len(order) and not any(significant.get(frozenset((order[j], order[end + 1])), False)
                                               for j in range(start, end + 1)):
            end += 1
        if not any(s <= start and end <= e for s, e in runs_found):
            runs_found.append((start, end))
    letters = {name: "" for name in names}
    for number, (start, end) in enumerate(runs_found):
        for name in order[start:end + 1]:
            letters[name] += chr(ord("a") + number % 26)
    return letters


def item_ranks(predictions: pd.DataFrame, runs: pd.DataFrame, split: str = SPLIT,
               resamples: int = RANK_RESAMPLES, seed: int = RANK_SEED) -> pd.DataFrame:
    """P(rank = r) of every condition per family (two-way bootstrap) and its tie group (crossed tests, Holm)."""
    rows = []
    selected = predictions[predictions["split"] == split]
    rng = np.random.default_rng(seed)
    for family, kind in _families(runs):
        column, conditions, baseline = _conditions(runs, family)
        family_predictions = selected[selected["family"] == family]
        present = [c for c in conditions if (family_predictions[column] == c).any()]
        if len(present) < 2:
            continue
        strata = crossed_arrays(family_predictions, column, present)
        if not strata:
            continue
        weights = np.array([len(s["seeds"]) * len(s["items"]) for s in strata], dtype=float)
        weights /= weights.sum()
        draws = np.zeros((resamples, len(present)))
        means = np.zeros(len(present))
        for w, stratum in zip(weights, strata):
            k, m = len(stratum["seeds"]), len(stratum["items"])
            seed_counts = rng.multinomial(k, np.full(k, 1 / k), size=resamples) / k  # resamples x k
            item_counts = rng.multinomial(m, np.full(m, 1 / m), size=resamples) / m  # resamples x m
            for j, condition in enumerate(present):
                array = stratum["arrays"][condition]
                means[j] += w * array.mean()
                draws[:, j] += w * np.einsum("rk,km,rm->r", seed_counts, array, item_counts)
        # Rank 1 = best; ties in a draw share the better rank's probability in draw order (rare with many items).
        ranks = (-draws).argsort(axis=1, kind="stable").argsort(axis=1) + 1
        probabilities = np.stack([(ranks == r).mean(axis=0) for r in range(1, len(present) + 1)], axis=1)
        pair_p, pairs = [], []
        for i in range(len(present)):
            for j in range(i + 1, len(present)):
                fit, _ = _pair_fit(strata, present[i], present[j])
                pair_p.append(t_result(fit)["p_value"] if fit else math.nan)
                pairs.append(frozenset((present[i], present[j])))
        adjusted = holm(pd.Series(pair_p)).to_numpy()
        significant = {pair: bool(p < ALPHA) for pair, p in zip(pairs, adjusted)}
        groups = tie_groups(present, means, significant)
        k_total = sum(len(s["seeds"]) for s in strata)
        m_total = sum(len(s["items"]) for s in strata)
        for j, condition in enumerate(present):
            for r in range(len(present)):
                rows.append({"family": family, "family_kind": kind, "split": split, "variant": condition,
                             "is_baseline": condition == baseline, "n_seeds": k_total, "n_items": m_total,
                             "mean": float(means[j]),
                             "mean_rank": float(probabilities[j] @ np.arange(1, len(present) + 1)),
                             "p_rank1": float(probabilities[j, 0]), "tie_group": groups[condition], "rank": r + 1,
                             "probability": float(probabilities[j, r])})
    return pd.DataFrame(rows, columns=ITEM_RANKS_COLUMNS)


def logit_interval(fit: dict) -> tuple[float, float]:
    """95 % interval of an accuracy from its crossed fit: t interval on the logit scale (delta method), back."""
    p, var, df = float(fit["mean"]), float(fit["var"]), float(fit["df"])
    if p in (0.0, 1.0):
        # Every run right (or wrong) on every example: the exact binomial (Clopper-Pearson) bound for the m items.
        bound = (1 - CONFIDENCE) / 2
        return (bound ** (1 / fit["m"]), 1.0) if p == 1.0 else (0.0, 1 - bound ** (1 / fit["m"]))
    if not (var > 0 and np.isfinite(df)):
        return math.nan, math.nan
    centre = math.log(p / (1 - p))
    half = float(scipy_stats.t.ppf(0.5 + CONFIDENCE / 2, df)) * math.sqrt(var) / (p * (1 - p))
    return 1 / (1 + math.exp(-(centre - half))), 1 / (1 + math.exp(-(centre + half)))


def item_summary(predictions: pd.DataFrame, runs: pd.DataFrame) -> pd.DataFrame:
    """Each condition's accuracy per split with the crossed model's interval (logit scale, inside [0, 1])."""
    rows = []
    for family in family_order(runs):
        kind = str(runs.loc[runs["family"] == family, "family_kind"].iloc[0])
        column = kind_spec(kind).setting_column
        family_predictions = predictions[predictions["family"] == family]
        for (split, condition), group in family_predictions.groupby(["split", column], sort=False):
            fits = []
            for _, stratum in group.groupby(["data_key", "data_seed"], sort=True):
                table = stratum.pivot_table(index="train_seed", columns="example_id", values="correct", aggfunc="mean")
                table = table.dropna(axis=1)  # examples every seed scored
                if table.shape[0] >= 2 and table.shape[1] >= 2:
                    fits.append({k: (float(v) if np.ndim(v) == 0 else v)
                                 for k, v in crossed_moments(table.to_numpy(dtype=float)).items()})
            if not fits:
                continue
            fit = combine_strata(fits)
            low, high = logit_interval(fit)
            rows.append({"family": family, "family_kind": kind, "variant": condition, "split": split,
                         "n_seeds": int(fit["k"]), "n_items": int(fit["m"]),
                         "design": f"{int(fit['k'])} seeds x {int(fit['m'] / max(fit['strata'], 1)):.0f} items"
                         if fit["strata"] == 1 else f"{int(fit['k'])} seeds over {fit['strata']} data seeds",
                         "mean": fit["mean"], "ci_low": low, "ci_high": high,
                         "ci_method": "crossed items x seeds, t on the logit scale", "se": math.sqrt(fit["var"]),
                         "df": fit["df"]})
    return pd.DataFrame(rows, columns=ITEM_SUMMARY_COLUMNS)


def with_item_seeds(seed_consistency: pd.DataFrame, tests: pd.DataFrame) -> pd.DataFrame:
    """``seed_consistency`` plus the item-level figure: seeds for one point with the crossed test (``n_items``
    examples as in the study; inf when the item floor alone is too wide: more examples needed)."""
    out = seed_consistency.copy()
    out["n_items"] = pd.array([pd.NA] * len(out), dtype="Int64")
    out["seeds_for_1pt_items"] = math.nan
    if tests.empty or out.empty:
        return out
    indexed = tests.set_index(["family", "variant"])
    for position, row in out.iterrows():
        key = (row["family"], row["variant"])
        if row.get("metric") != "accuracy" or row.get("split") != SPLIT or key not in indexed.index:
            continue
        test = indexed.loc[key]
        if isinstance(test, pd.DataFrame):
            test = test.iloc[0]
        if not test["n_items"]:
            continue
        m = int(test["n_items"] / max(int(test["n_strata"]), 1))
        out.loc[position, "n_items"] = m
        out.loc[position, "seeds_for_1pt_items"] = seeds_needed(
            test["sd_seed"] ** 2, test["sd_item"] ** 2, test["sd_residual"] ** 2, m, row.get("delta", ONE_POINT))
    return out


# ----------------------------------------------------------------------------------------------------
# Calibration: planted item-level effects


def simulate_predictions(rng: np.random.Generator, replicates: int, seeds: int, items: int, effect: float,
                         sd_method_item: float, sd_method_seed: float, sd_flip: float = 1.0,
                         mean_logit: float = 2.0, sd_difficulty: float = 1.5) -> np.ndarray:
    """Simulated correctness of a variant and a baseline: (replicates, 2, seeds, items) booleans.

    logit P(correct) = difficulty[i] + effect (variant only) + method x item + method x seed + flip noise
    (method x seed x item): the planted ``effect`` is on the logit scale, the rest are the ways real runs
    differ (hard examples, examples one method gets and the other does not, a lucky seed, borderline flips).
    """
    shape = (replicates, 2, seeds, items)
    logit = (rng.normal(mean_logit, sd_difficulty, (replicates, 1, 1, items))
             + np.array([effect, 0.0])[None, :, None, None]
             + rng.normal(0, sd_method_item, (replicates, 2, 1, items))
             + rng.normal(0, sd_method_seed, (replicates, 2, seeds, 1))
             + rng.normal(0, sd_flip, shape))
    return rng.random(shape) < 1 / (1 + np.exp(-logit))


TRUTH_SEEDS, TRUTH_ITEMS = 200, 4000
CALIBRATION_SCENARIOS = (
    # (name, sd method x item, sd method x seed)
    ("flips only", 0.0, 0.0),
    ("item effects", 0.5, 0.0),
    ("seed effects", 0.0, 0.1),
    ("item and seed effects", 0.5, 0.1),
    # Seeds that shift a method's accuracy by about 3 points (sd) as a whole, as in the converged reference.
    ("large seed effects", 0.0, 0.2),
)


def calibrate(replicates: int = 2000, seeds: tuple[int, ...] = (3, 5), items: int = 400,
              effects: tuple[float, ...] = (0.0, 0.1), scenarios=CALIBRATION_SCENARIOS,
              seed: int = 0) -> pd.DataFrame:
    """Rejection rates at alpha 0.05 of the crossed item-level test and the seed-level paired t test.

    One row per scenario x seeds x planted effect (logit): ``effect_points`` is the mean accuracy difference it
    made, ``reject_items`` / ``reject_seeds`` the rates (the false-positive rates when the effect is 0), and
    ``seeds_for_1pt_items`` / ``seeds_for_1pt_seeds`` the seeds each test needs for 80 % power at one point,
    from the components the simulated arrays estimate (averaged over replicates).
    """
    rng = np.random.default_rng(seed)
    rows = []
    for name, sd_item, sd_seed in scenarios:
        for k in seeds:
            for effect in effects:
                correct = simulate_predictions(rng, replicates, k, items, effect, sd_item, sd_seed)
                d = correct[:, 0].astype(float) - correct[:, 1].astype(float)
                fit = crossed_moments(d)
                with np.errstate(invalid="ignore", divide="ignore"):
                    t = np.abs(fit["mean"]) / np.sqrt(fit["var"])
                    p_items = 2 * scipy_stats.t.sf(t, fit["df"])
                    per_seed = d.mean(axis=-1)
                    se = per_seed.std(axis=-1, ddof=1) / math.sqrt(k)
                    p_seeds = 2 * scipy_stats.t.sf(np.abs(per_seed.mean(-1)) / se, k - 1)
                # The components the test would converge to: one large simulated design (many seeds, many items).
                big = simulate_predictions(rng, 1, TRUTH_SEEDS, TRUTH_ITEMS, effect, sd_item, sd_seed)[0]
                truth = crossed_moments(big[0].astype(float) - big[1].astype(float))
                per_seed_sd = math.sqrt(float(truth["s2_seed"]) + float(truth["s2_resid"]) / items)
                rows.append({"scenario": name, "sd_method_item": sd_item, "sd_method_seed": sd_seed, "seeds": k,
                             "items": items, "effect_logit": effect, "effect_points": float(d.mean()) * 100,
                             "reject_items": float(np.nanmean(p_items < ALPHA)),
                             "reject_seeds": float(np.nanmean(p_seeds < ALPHA)),
                             "seeds_for_1pt_items": seeds_needed(float(truth["s2_seed"]), float(truth["s2_item"]),
                                                                 float(truth["s2_resid"]), items),
                             "seeds_for_1pt_seeds": seeds_needed_noted(ONE_POINT / per_seed_sd,
                                                                              paired=True)[0]})
    return pd.DataFrame(rows)


# ----------------------------------------------------------------------------------------------------
# Files


def stage_rows(predictions: pd.DataFrame, stage: str | None = "final") -> pd.DataFrame:
    """The rows of ``stage`` of a predictions table: ``final``, the selected epoch's (one row per run x split x
    example, what every item table compares), or ``epoch``, the test rows after each epoch of runs that tested
    after every epoch; None keeps all. Tables from before the stage column hold only the selected epoch's rows."""
    if stage is None or predictions.empty:
        return predictions
    stages = predictions["stage"] if "stage" in predictions else pd.Series("final", index=predictions.index)
    return predictions[stages == stage]


def read_predictions(tables_dir: str | Path, stage: str | None = "final") -> pd.DataFrame:
    """The ``predictions`` table of ``tables_dir`` (empty when the study kept none), its rows of ``stage``."""
    path = Path(tables_dir) / "predictions.parquet"
    return stage_rows(pd.read_parquet(path) if path.exists() else pd.DataFrame(), stage)


def run_item_stats(tables_dir: str | Path, out_dir: str | Path) -> dict[str, Path]:
    """Read ``predictions`` and ``runs`` (and ``seed_consistency``), write the item tables; what ``stats`` calls.

    Every table is written, empty with its columns, when the study kept no predictions (records from before
    predictions, or cost-only studies), so the workflow's outputs do not depend on the config.
    """
    tables_dir, out_dir = Path(tables_dir), Path(out_dir)
    runs = pd.read_parquet(tables_dir / "runs.parquet")
    predictions = read_predictions(tables_dir, stage=None)  # the epochs families' tests read stage "epoch"
    if predictions.empty:
        tables = {"item_tests": pd.DataFrame(columns=ITEM_TESTS_COLUMNS),
                  "item_pairs": pd.DataFrame(columns=ITEM_PAIRS_COLUMNS),
                  "item_ranks": pd.DataFrame(columns=ITEM_RANKS_COLUMNS),
                  "item_summary": pd.DataFrame(columns=ITEM_SUMMARY_COLUMNS)}
    else:
        final = stage_rows(predictions, "final")
        tables = {"item_tests": item_tests(predictions, runs), "item_pairs": item_pairs(predictions, runs),
                  "item_ranks": item_ranks(final, runs), "item_summary": item_summary(final, runs)}
    seed_path = out_dir / "seed_consistency.parquet"
    if seed_path.exists():
        tables["seed_consistency"] = with_item_seeds(pd.read_parquet(seed_path), tables["item_tests"])
    return write_named_tables(tables, out_dir)

"""Tests of lora_bench.stats: p-values match scipy, planted effects are found, and the error rates hold.

The null simulation is the important one: with 4 variants that truly equal the baseline, Holm's
correction must keep the chance of any false claim in a family near 5 %, while each single test
rejects about 5 % of the time before correction.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest
from scipy import stats as scipy_stats
from statsmodels.stats.multitest import multipletests
from synthetic import FamilySpec, make_tables

from lora_bench import stats

NULL_FAMILY = FamilySpec(name="null", kind="generic", variants=("base", "v1", "v2", "v3", "v4"))


def _tables_from_values(values: dict[str, dict[int, float]], kind: str = "generic", metric: str = "accuracy"):
    """Runs/metrics tables of one family from {variant: {seed: value}}; the first variant is the baseline."""
    higher = metric == "accuracy"
    runs, metrics = [], []
    baseline = next(iter(values))
    for variant, by_seed in values.items():
        for seed, value in by_seed.items():
            labels = {
                "run_id": f"fam/{variant}/seed{seed}",
                "family": "fam",
                "family_kind": kind,
                "variant": variant,
                "seed": seed,
                "is_baseline": variant == baseline,
                "status": "ok",
                "method": "lora",
            }
            runs.append({**labels, "error": ""})
            metrics.append(
                {
                    **labels,
                    "metric": metric,
                    "split": "test" if higher else "none",
                    "epoch": 1,
                    "stage": "final",
                    "value": value,
                    "unit": "fraction" if higher else "bytes",
                    "higher_is_better": higher,
                }
            )
    return pd.DataFrame(runs), pd.DataFrame(metrics)


BASE = {0: 0.80, 1: 0.82, 2: 0.79, 3: 0.81, 4: 0.83}
VARIANT = {0: 0.815, 1: 0.822, 2: 0.805, 3: 0.83, 4: 0.84}


def test_paired_p_values_equal_scipy():
    runs, metrics = _tables_from_values({"base": BASE, "better": VARIANT})
    row = stats.compare_to_baseline(metrics, runs).iloc[0]
    v, b = np.array(list(VARIANT.values())), np.array(list(BASE.values()))
    assert row["paired"] and row["test"] == "paired t" and row["n_pairs"] == 5
    assert row["p_value"] == pytest.approx(scipy_stats.ttest_rel(v, b).pvalue, rel=1e-12)
    assert row["p_nonparametric"] == pytest.approx(scipy_stats.wilcoxon(v, b).pvalue, rel=1e-12)
    assert row["nonparametric_test"] == "Wilcoxon signed-rank"
    interval = scipy_stats.ttest_rel(v, b).confidence_interval()
    assert (row["diff_ci_low"], row["diff_ci_high"]) == pytest.approx((interval.low, interval.high))
    assert row["diff"] == pytest.approx(np.mean(v - b))
    assert row["effect_size"] == pytest.approx(np.mean(v - b) / np.std(v - b, ddof=1))
    assert row["effect_ci_low"] < row["effect_size"] < row["effect_ci_high"]
    # A single comparison in the family: Holm changes nothing.
    assert row["p_holm"] == pytest.approx(row["p_value"])


def test_unpaired_path_when_seeds_do_not_overlap():
    shifted = {seed + 100: value for seed, value in VARIANT.items()}
    runs, metrics = _tables_from_values({"base": BASE, "other": shifted})
    row = stats.compare_to_baseline(metrics, runs).iloc[0]
    v, b = np.array(list(shifted.values())), np.array(list(BASE.values()))
    assert not row["paired"] and row["test"] == "Welch t" and row["n_pairs"] == 0
    assert row["p_value"] == pytest.approx(scipy_stats.ttest_ind(v, b, equal_var=False).pvalue, rel=1e-12)
    assert row["p_nonparametric"] == pytest.approx(
        scipy_stats.mannwhitneyu(v, b, alternative="two-sided").pvalue, rel=1e-12
    )
    assert row["nonparametric_test"] == "Mann-Whitney U"
    assert row["effect_size_kind"] == "d"


def test_unpaired_path_is_also_taken_by_synthetic_tables():
    runs, metrics = make_tables(["methods"], n_seeds=4, variant_seeds={("methods", "full"): [10, 11, 12, 13]})
    tests = stats.compare_to_baseline(metrics, runs).set_index("variant")
    assert not tests.loc["full", "paired"]
    assert tests.loc["last_layers", "paired"]


def test_holm_matches_statsmodels():
    p = np.random.default_rng(1).uniform(0, 0.2, 7)
    assert stats.holm_adjust(p) == pytest.approx(multipletests(p, method="holm")[1])


def test_planted_difference_is_significant():
    runs, metrics = make_tables(
        ["methods"], n_seeds=5, effects={("methods", "full"): 0.03}, seed_std=0.0, noise_std=0.005, rng_seed=3
    )
    tests = stats.compare_to_baseline(metrics, runs).set_index("variant")
    full = tests.loc["full"]
    assert full["significant"] and full["direction"] == "higher" and full["verdict"] == "better"
    assert full["diff_ci_low"] < 0.03 < full["diff_ci_high"]
    # Variants with no planted effect stay unremarkable.
    assert not tests.loc["lora_head_frozen", "significant"]


def test_direction_follows_lower_is_better_metrics():
    lower = {seed: 2.0e9 - 3e8 + 1e6 * seed for seed in BASE}
    base = {seed: 2.0e9 + 2e6 * seed for seed in BASE}
    runs, metrics = _tables_from_values({"base": base, "smaller": lower}, metric="peak_rss")
    row = stats.compare_to_baseline(metrics, runs, metric="peak_rss", split="none").iloc[0]
    assert row["direction"] == "lower" and row["verdict"] == "better"
    assert not row["higher_is_better"]


def test_null_simulation_controls_family_wise_error():
    """300 null data sets, 4 variants vs a baseline, 5 seeds: Holm keeps the family-wise rate near 5 %."""
    families_with_a_false_claim, raw_rejections, comparisons = 0, 0, 0
    for dataset in range(300):
        runs, metrics = make_tables([NULL_FAMILY], n_seeds=5, rng_seed=1000 + dataset)
        tests = stats.compare_to_baseline(metrics, runs)
        assert len(tests) == 4
        families_with_a_false_claim += bool((tests["p_holm"] < 0.05).any())
        raw_rejections += int((tests["p_value"] < 0.05).sum())
        comparisons += len(tests)
    family_wise_rate = families_with_a_false_claim / 300
    per_comparison_rate = raw_rejections / comparisons
    assert family_wise_rate <= 0.08
    # 1200 tests at 5 %: a binomial standard error of 0.0063, widened for the shared baseline.
    assert abs(per_comparison_rate - 0.05) <= 0.025


def test_wilcoxon_all_zero_differences_gives_p_one():
    runs, metrics = _tables_from_values({"base": BASE, "same": dict(BASE)})
    row = stats.compare_to_baseline(metrics, runs).iloc[0]
    assert row["p_nonparametric"] == 1.0
    assert math.isnan(row["p_value"]) and "zero variance" in row["note"]
    assert row["verdict"] == "n.s."


def test_fewer_than_two_runs_gives_nan_and_note():
    runs, metrics = _tables_from_values({"base": BASE, "lonely": {0: 0.9}})
    row = stats.compare_to_baseline(metrics, runs).iloc[0]
    assert math.isnan(row["p_value"]) and math.isnan(row["p_holm"]) and math.isnan(row["p_nonparametric"])
    assert "at least 2" in row["note"]
    assert row["n_variant"] == 1 and not row["significant"] and row["direction"] == "n.s."


def test_failed_runs_are_excluded_and_noted():
    runs, metrics = make_tables(["methods"], n_seeds=3, failed=["methods/full/seed1"])
    # The failed run left an epoch-1 row behind; it must not count anywhere.
    assert (metrics["run_id"] == "methods/full/seed1").any()
    tests = stats.compare_to_baseline(metrics, runs).set_index("variant")
    assert tests.loc["full", "n_variant"] == 2
    assert "failed" in tests.loc["full", "note"]
    summary = stats.summarize(metrics).set_index("variant")
    assert summary.loc["full", "n"] == 2


def test_epochs_family_compares_each_epoch_with_epoch_one():
    runs, metrics = make_tables(["epochs"], n_seeds=4, n_epochs=3)
    tests = stats.compare_to_baseline(metrics, runs)
    assert set(tests["variant"]) == {"lora@epoch2", "lora@epoch3", "full@epoch2", "full@epoch3"}
    assert set(tests["baseline"]) == {"lora@epoch1", "full@epoch1"}
    assert (tests["stage"] == "epoch").all() and tests["paired"].all()


def test_summarize_interval_contains_mean_and_is_deterministic():
    runs, metrics = make_tables(["methods", "coverage"], n_seeds=5)
    summary = stats.summarize(metrics)
    assert (summary["ci_low"] <= summary["mean"]).all() and (summary["mean"] <= summary["ci_high"]).all()
    assert (summary["ci_method"] == "bootstrap BCa").all()
    assert list(summary["variant"][:4]) == ["lora", "lora_head_frozen", "last_layers", "full"]
    pd.testing.assert_frame_equal(summary, stats.summarize(metrics))


def test_summarize_small_samples():
    runs, metrics = make_tables(["methods"], n_seeds=2)
    assert (stats.summarize(metrics)["ci_method"] == "t (n = 2)").all()
    runs, metrics = make_tables(["methods"], n_seeds=1)
    one = stats.summarize(metrics)
    assert one["ci_low"].isna().all() and (one["ci_method"] == "none (n < 2)").all() and (one["n"] == 1).all()


def test_summarize_epochs_rows_per_epoch():
    runs, metrics = make_tables(["epochs"], n_seeds=3, n_epochs=4)
    summary = stats.summarize_epochs(metrics, "accuracy", "validation")
    assert len(summary) == 2 * 4
    assert list(summary["epoch"][:4]) == [1, 2, 3, 4]


def test_seeds_for_one_point_decreases_with_std():
    needed = []
    for noise in (0.02, 0.01, 0.004):
        runs, metrics = make_tables(["methods"], n_seeds=5, seed_std=0.0, noise_std=noise, rng_seed=7)
        table = stats.seed_consistency(metrics, runs).set_index("variant")
        needed.append(table.loc["lora", "seeds_for_1pt"])
    assert needed[0] > needed[1] > needed[2] >= 2
    assert table["seeds_for_1pt_paired"].isna()["lora"]  # the baseline has no paired requirement


def test_seeds_for_one_point_nan_for_constant_or_single():
    runs, metrics = _tables_from_values({"base": {0: 0.8, 1: 0.8}, "one": {0: 0.7}})
    table = stats.seed_consistency(metrics, runs).set_index("variant")
    assert math.isnan(table.loc["base", "seeds_for_1pt"]) and math.isnan(table.loc["one", "seeds_for_1pt"])


def test_run_stats_writes_all_tables(tmp_path):
    runs, metrics = make_tables(["methods", "epochs"], n_seeds=3, failed=["methods/full/seed0"])
    runs.to_parquet(tmp_path / "runs.parquet")
    metrics.to_parquet(tmp_path / "metrics.parquet")
    out = tmp_path / "stats"
    written = stats.run_stats(tmp_path / "metrics.parquet", tmp_path / "runs.parquet", out)
    for name in ("tests", "summary", "seed_consistency"):
        assert (out / f"{name}.parquet").stat().st_size > 0 and (out / f"{name}.csv").stat().st_size > 0
        assert written[name] == out / f"{name}.parquet"
    tests = pd.read_parquet(out / "tests.parquet")
    assert list(tests.columns) == stats.TESTS_COLUMNS
    assert {"accuracy", "wall_time", "peak_rss"} <= set(tests["metric"])
    summary = pd.read_parquet(out / "summary.parquet")
    assert {"final", "epoch"} == set(summary["stage"])
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_family_whose_runs_all_failed_still_gets_rows():
    everything_in_methods = [
        f"methods/{variant}/seed{seed}"
        for variant in ("lora", "lora_head_frozen", "last_layers", "full")
        for seed in (0, 1)
    ]
    runs, metrics = make_tables(["methods", "coverage"], n_seeds=2, failed=everything_in_methods)
    tests = stats.compare_to_baseline(metrics, runs)
    methods = tests[tests["family"] == "methods"]
    assert len(methods) == 3 and methods["p_value"].isna().all()
    assert methods["note"].str.contains("0 ok run").all()
    assert tests.loc[tests["family"] == "coverage", "p_value"].notna().all()

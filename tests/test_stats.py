"""Tests of lora_bench.analysis (summary, compare, power, cost, stats): p-values match scipy, planted effects are
found, and the error rates hold.

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
from synthetic import MEMORY_TIME_PLANTED, FamilySpec, make_tables, memory_time_family

from lora_bench.analysis import compare, power, stats
from lora_bench.analysis.cost import COST_SUMMARY_COLUMNS, cost_metrics, cost_summary, memory_metric, peft_counterparts
from lora_bench.analysis.summary import _describe, _mean_interval, summarize, summarize_epochs

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
    row = compare.compare_to_baseline(metrics, runs).iloc[0]
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
    row = compare.compare_to_baseline(metrics, runs).iloc[0]
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
    tests = compare.compare_to_baseline(metrics, runs).set_index("variant")
    assert not tests.loc["full", "paired"]
    assert tests.loc["last_layers", "paired"]


def test_detectable_difference_has_the_stated_power():
    """Planted at the detectable difference, a paired t test at alpha 0.05 rejects in about 80 % of repeats; it
    equals statsmodels' solved effect size times the spread, paired (n - 1 df) and unpaired (2n - 2 df)."""
    from statsmodels.stats.power import TTestIndPower, TTestPower

    from lora_bench.analysis.summary import detectable_difference

    for n in (2, 3, 5, 12, 400):  # 2: one degree of freedom, where scipy's noncentral t gives NaN
        assert detectable_difference(0.02 / math.sqrt(n), n - 1) == pytest.approx(
            0.02 * TTestPower().solve_power(nobs=n, alpha=0.05, power=0.8), rel=1e-6)
    assert detectable_difference(0.02 * math.sqrt(2 / 4), 6) == pytest.approx(
        0.02 * TTestIndPower().solve_power(nobs1=4, alpha=0.05, power=0.8), rel=1e-6)
    n, sd = 4, 0.03
    delta = detectable_difference(sd / math.sqrt(n), n - 1)
    rng = np.random.default_rng(7)
    differences = delta + sd * rng.standard_normal((20_000, n))
    rejected = scipy_stats.ttest_1samp(differences, 0.0, axis=1).pvalue < 0.05
    assert rejected.mean() == pytest.approx(0.8, abs=0.015)
    for undefined in ((0.0, 3), (math.nan, 3), (0.01, 0), (0.01, math.inf)):
        assert math.isnan(detectable_difference(*undefined))


def test_comparisons_state_what_a_null_result_rules_out():
    runs, metrics = _tables_from_values({"base": BASE, "better": VARIANT})
    row = compare.compare_to_baseline(metrics, runs).iloc[0]
    differences = np.array(list(VARIANT.values())) - np.array(list(BASE.values()))
    from lora_bench.analysis.summary import detectable_difference

    assert row["detectable_diff"] == pytest.approx(detectable_difference(
        np.std(differences, ddof=1) / math.sqrt(5), 4))
    shifted = {seed + 100: value for seed, value in VARIANT.items()}
    runs, metrics = _tables_from_values({"base": BASE, "other": shifted})
    unpaired = compare.compare_to_baseline(metrics, runs).iloc[0]
    # Welch: wider than the paired design on the same values (the seed effect is no longer removed).
    assert unpaired["detectable_diff"] > row["detectable_diff"] > 0
    runs, metrics = _tables_from_values({"base": BASE, "same": dict(BASE)})
    assert math.isnan(compare.compare_to_baseline(metrics, runs).iloc[0]["detectable_diff"])  # zero variance


def test_holm_matches_statsmodels():
    p = np.random.default_rng(1).uniform(0, 0.2, 7)
    assert compare.holm_adjust(p) == pytest.approx(multipletests(p, method="holm")[1])


def test_planted_difference_is_significant():
    runs, metrics = make_tables(
        ["methods"], n_seeds=5, effects={("methods", "full"): 0.03}, seed_std=0.0, noise_std=0.005, rng_seed=3
    )
    tests = compare.compare_to_baseline(metrics, runs).set_index("variant")
    full = tests.loc["full"]
    assert full["significant"] and full["direction"] == "higher" and full["verdict"] == "better"
    assert full["diff_ci_low"] < 0.03 < full["diff_ci_high"]
    # Variants with no planted effect stay unremarkable.
    assert not tests.loc["lora_head_frozen", "significant"]


def test_direction_follows_lower_is_better_metrics():
    lower = {seed: 2.0e9 - 3e8 + 1e6 * seed for seed in BASE}
    base = {seed: 2.0e9 + 2e6 * seed for seed in BASE}
    runs, metrics = _tables_from_values({"base": base, "smaller": lower}, metric="peak_rss")
    row = compare.compare_to_baseline(metrics, runs, metric="peak_rss", split="none").iloc[0]
    assert row["direction"] == "lower" and row["verdict"] == "better"
    assert not row["higher_is_better"]


def test_null_simulation_controls_family_wise_error():
    """300 null data sets, 4 variants vs a baseline, 5 seeds: Holm keeps the family-wise rate near 5 %."""
    families_with_a_false_claim, raw_rejections, comparisons = 0, 0, 0
    for dataset in range(300):
        runs, metrics = make_tables([NULL_FAMILY], n_seeds=5, rng_seed=1000 + dataset)
        tests = compare.compare_to_baseline(metrics, runs)
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
    row = compare.compare_to_baseline(metrics, runs).iloc[0]
    assert row["p_nonparametric"] == 1.0
    assert math.isnan(row["p_value"]) and "zero variance" in row["note"]
    assert row["verdict"] == "n.s."


def test_fewer_than_two_runs_gives_nan_and_note():
    runs, metrics = _tables_from_values({"base": BASE, "lonely": {0: 0.9}})
    row = compare.compare_to_baseline(metrics, runs).iloc[0]
    assert math.isnan(row["p_value"]) and math.isnan(row["p_holm"]) and math.isnan(row["p_nonparametric"])
    assert "at least 2" in row["note"]
    assert row["n_variant"] == 1 and not row["significant"] and row["direction"] == "n.s."


def test_failed_runs_are_excluded_and_noted():
    runs, metrics = make_tables(["methods"], n_seeds=3, failed=["methods/full/seed1"])
    # The failed run left an epoch-1 row behind; it must not count anywhere.
    assert (metrics["run_id"] == "methods/full/seed1").any()
    tests = compare.compare_to_baseline(metrics, runs).set_index("variant")
    assert tests.loc["full", "n_variant"] == 2
    assert "failed" in tests.loc["full", "note"]
    summary = summarize(metrics).set_index("variant")
    assert summary.loc["full", "n"] == 2


def test_epochs_family_compares_each_epoch_with_epoch_one():
    runs, metrics = make_tables(["epochs"], n_seeds=4, n_epochs=3)
    tests = compare.compare_to_baseline(metrics, runs)
    assert set(tests["variant"]) == {"lora@epoch2", "lora@epoch3", "full@epoch2", "full@epoch3"}
    assert set(tests["baseline"]) == {"lora@epoch1", "full@epoch1"}
    assert (tests["stage"] == "epoch").all() and tests["paired"].all()


def test_summarize_interval_contains_mean_and_is_deterministic():
    runs, metrics = make_tables(["methods", "coverage"], n_seeds=5)
    summary = summarize(metrics)
    assert (summary["ci_low"] <= summary["mean"]).all() and (summary["mean"] <= summary["ci_high"]).all()
    assert (summary["ci_method"] == "bootstrap BCa").all()
    assert list(summary["variant"][:4]) == ["lora", "lora_head_frozen", "last_layers", "full"]
    pd.testing.assert_frame_equal(summary, summarize(metrics))


def test_summarize_small_samples():
    runs, metrics = make_tables(["methods"], n_seeds=2)
    # Accuracy is bounded: its t interval is taken on the logit scale and stays inside [0, 1].
    assert (summarize(metrics)["ci_method"] == "t (n = 2), logit scale").all()
    runs, metrics = make_tables(["methods"], n_seeds=1)
    one = summarize(metrics)
    assert one["ci_low"].isna().all() and (one["ci_method"] == "none (n < 2)").all() and (one["n"] == 1).all()


def test_two_seed_interval_of_an_accuracy_stays_inside_zero_one():
    # The case: two seeds with a mean of 86.3 % gave a t interval of 38.6-133.9 %.
    values = np.array([0.825, 0.901])
    described = _describe(values, "fraction")
    assert 0 < described["ci_low"] < 0.863 < described["ci_high"] < 1
    assert described["t_ci_low"] == described["ci_low"] and described["ci_method"] == "t (n = 2), logit scale"
    plain = _describe(values)  # unbounded units keep the plain t interval
    assert plain["ci_high"] > 1 and plain["ci_method"] == "t (n = 2)"


def test_summarize_epochs_rows_per_epoch():
    runs, metrics = make_tables(["epochs"], n_seeds=3, n_epochs=4)
    summary = summarize_epochs(metrics, "accuracy", "validation")
    assert len(summary) == 2 * 4
    assert list(summary["epoch"][:4]) == [1, 2, 3, 4]


def test_seeds_for_one_point_decreases_with_std():
    needed = []
    for noise in (0.02, 0.01, 0.004):
        runs, metrics = make_tables(["methods"], n_seeds=5, seed_std=0.0, noise_std=noise, rng_seed=7)
        table = power.seed_consistency(metrics, runs).set_index("variant")
        needed.append(table.loc["lora", "seeds_for_1pt"])
    assert needed[0] > needed[1] > needed[2] >= 2
    assert table["seeds_for_1pt_paired"].isna()["lora"]  # the baseline has no paired requirement


def test_seeds_for_one_point_nan_for_constant_or_single():
    runs, metrics = _tables_from_values({"base": {0: 0.8, 1: 0.8}, "one": {0: 0.7}})
    table = power.seed_consistency(metrics, runs).set_index("variant")
    assert math.isnan(table.loc["base", "seeds_for_1pt"]) and math.isnan(table.loc["one", "seeds_for_1pt"])


def test_run_stats_writes_all_tables(tmp_path):
    runs, metrics = make_tables(["methods", "epochs"], n_seeds=3, failed=["methods/full/seed0"])
    runs.to_parquet(tmp_path / "runs.parquet")
    metrics.to_parquet(tmp_path / "metrics.parquet")
    out = tmp_path / "stats"
    written = stats.run_stats(tmp_path / "metrics.parquet", tmp_path / "runs.parquet", out)
    for name in ("tests", "summary", "seed_consistency", "cost_summary"):
        assert (out / f"{name}.parquet").stat().st_size > 0 and (out / f"{name}.csv").stat().st_size > 0
        assert written[name] == out / f"{name}.parquet"
    tests = pd.read_parquet(out / "tests.parquet")
    assert list(tests.columns) == compare.TESTS_COLUMNS
    assert {"accuracy", "wall_time", "peak_rss"} <= set(tests["metric"])
    summary = pd.read_parquet(out / "summary.parquet")
    assert {"final", "epoch"} == set(summary["stage"])
    # No memory_time family: the cost summary is empty but has its columns, so the outputs are stable.
    cost = pd.read_parquet(out / "cost_summary.parquet")
    assert cost.empty and list(cost.columns) == COST_SUMMARY_COLUMNS
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_family_whose_runs_all_failed_still_gets_rows():
    everything_in_methods = [
        f"methods/{variant}/seed{seed}"
        for variant in ("lora", "lora_head_frozen", "last_layers", "full")
        for seed in (0, 1)
    ]
    runs, metrics = make_tables(["methods", "coverage"], n_seeds=2, failed=everything_in_methods)
    tests = compare.compare_to_baseline(metrics, runs)
    methods = tests[tests["family"] == "methods"]
    assert len(methods) == 3 and methods["p_value"].isna().all()
    assert methods["note"].str.contains("0 ok run").all()
    assert tests.loc[tests["family"] == "coverage", "p_value"].notna().all()


# ----------------------------------------------------------------------------------------------------
# Ratios and memory_time families

GPU = "cuda:0 (NVIDIA H100 80GB HBM3)"


def test_ratio_interval_inverts_the_paired_t_test():
    """Fieller's ends are exactly where the paired t test of v - rho * b crosses p = 0.05."""
    rng = np.random.default_rng(5)
    b = rng.normal(10.0, 1.0, 5)
    v = 0.6 * b + rng.normal(0.0, 0.3, 5)
    ratio, low, high, note = compare.ratio_interval(v, b, paired=True)
    assert ratio == pytest.approx(v.mean() / b.mean()) and low < ratio < high and note == ""
    for end in (low, high):
        assert scipy_stats.ttest_1samp(v - end * b, 0.0).pvalue == pytest.approx(0.05, abs=1e-9)
    # Unpaired: Welch's t statistic at the ends is the critical value, with Welch-Satterthwaite degrees of
    # freedom taken at the estimated ratio (so Welch's own p at the ends is only near 0.05).
    w = b + 1.0
    ratio, low, high, _ = compare.ratio_interval(v, w, paired=False)
    s_v, s_w = v.var(ddof=1) / 5, w.var(ddof=1) / 5
    df = (s_v + ratio**2 * s_w) ** 2 / ((s_v**2 + (ratio**2 * s_w) ** 2) / 4)
    for end in (low, high):
        t = abs(v.mean() - end * w.mean()) / math.sqrt(s_v + end**2 * s_w)
        assert t == pytest.approx(scipy_stats.t.ppf(0.975, df), rel=1e-9)
        assert scipy_stats.ttest_ind(v, end * w, equal_var=False).pvalue == pytest.approx(0.05, abs=0.01)


def test_ratio_interval_edge_cases():
    exact = compare.ratio_interval(np.array([6.0, 6.0, 6.0]), np.array([10.0, 10.0, 10.0]), paired=True)
    assert exact[:3] == pytest.approx((0.6, 0.6, 0.6))
    unbounded = compare.ratio_interval(np.array([1.0, 2.0, 3.0]), np.array([-1.0, 1.0, 0.5]), paired=True)
    assert math.isnan(unbounded[1]) and math.isnan(unbounded[2]) and "unbounded" in unbounded[3]
    single = compare.ratio_interval(np.array([3.0]), np.array([2.0]), paired=False)
    assert single[0] == 1.5 and math.isnan(single[1])
    assert "zero" in compare.ratio_interval(np.array([1.0, 2.0]), np.array([0.0, 0.0]), paired=True)[3]
    # Three noisy times: the normal model's set reaches below 0, which a ratio of positive quantities cannot.
    noisy_times, steady = np.array([0.1, 0.2, 3.0]), np.array([1.0, 0.9, 1.1])
    ratio, low, high, _ = compare.ratio_interval(noisy_times, steady, paired=True, positive=True)
    assert low == 0.0 and high > ratio > 0
    # Values that may be negative by nature (an accuracy gain) keep the whole set, even when these happen not to be.
    assert compare.ratio_interval(noisy_times, steady, paired=True)[1] < 0
    assert "s" in compare.POSITIVE_UNITS and "bytes" in compare.POSITIVE_UNITS
    assert "fraction" not in compare.POSITIVE_UNITS


def _memory_time_tests(**kwargs) -> pd.DataFrame:
    runs, metrics = make_tables(["memory_time"], **kwargs)
    return stats.all_tests(metrics, runs)


def test_memory_time_ratios_recover_the_planted_ones_on_gpu():
    tests = _memory_time_tests(n_seeds=3, device=GPU, rng_seed=11)
    assert not (tests["metric"].isin(["accuracy", "loss"])).any()  # no accuracy rows: no NaN rows either
    assert {"peak_cuda_allocated", "median_step_time", "tokens_per_second", "base_weight_bytes"} <= set(
        tests["metric"]
    )
    assert "state_bytes" not in set(tests["metric"])  # the GPU's peak allocated memory is the memory metric
    by = tests.set_index(["variant", "metric"])
    for variant, metric, planted in (
        ("qlora", "peak_cuda_allocated", MEMORY_TIME_PLANTED["qlora"][0]),
        ("qlora", "median_step_time", MEMORY_TIME_PLANTED["qlora"][1]),
        ("full", "peak_cuda_allocated", MEMORY_TIME_PLANTED["full"][0]),
        ("full", "median_step_time", MEMORY_TIME_PLANTED["full"][1]),
    ):
        row = by.loc[(variant, metric)]
        assert row["paired"] and row["test"] == "paired t" and row["n_pairs"] == 3
        assert row["ratio"] == pytest.approx(row["mean_variant"] / row["mean_baseline"])
        assert row["ratio"] == pytest.approx(planted, rel=0.05)
        assert row["ratio_ci_low"] < planted < row["ratio_ci_high"], (variant, metric)
        assert row["significant"] and row["p_holm"] < 0.05 and not row["exact"]
    assert by.loc[("qlora", "peak_cuda_allocated"), "verdict"] == "better"
    assert by.loc[("qlora", "median_step_time"), "verdict"] == "worse"
    assert by.loc[("qlora", "tokens_per_second"), "direction"] == "lower"
    # Holm within family and metric: two comparisons per metric.
    for _, group in tests.groupby("metric"):
        assert len(group) == 2 and (group["p_holm"].fillna(1) >= group["p_value"].fillna(1) - 1e-15).all()


def test_memory_time_on_cpu_uses_exact_state_bytes():
    runs, metrics = make_tables(["memory_time"], n_seeds=3, device="cpu")
    assert memory_metric(metrics, "memory_time") == "state_bytes"
    assert cost_metrics(metrics, "memory_time") == [
        "state_bytes", "median_step_time", "tokens_per_second", "base_weight_bytes"
    ]  # fmt: skip
    tests = stats.all_tests(metrics, runs).set_index(["variant", "metric"])
    memory = tests.loc[("qlora", "state_bytes")]
    assert memory["ratio"] == pytest.approx(0.6) and memory["ratio_ci_low"] == memory["ratio_ci_high"]
    # Byte counts identical in every run: exact, no p-value, and the difference counts as established.
    assert memory["exact"] and math.isnan(memory["p_value"]) and memory["significant"]
    assert memory["verdict"] == "better" and "exact" in memory["note"]
    assert tests.loc[("full", "state_bytes"), "verdict"] == "worse"
    base = tests.loc[("full", "base_weight_bytes")]
    assert not base["exact"] and not base["significant"]  # same bytes: no difference at all
    assert tests.loc[("qlora", "base_weight_bytes"), "ratio"] == pytest.approx(MEMORY_TIME_PLANTED["qlora"][2])


def test_exact_applies_only_to_deterministic_units():
    # Constant accuracies (a small test set can do that) are not "exact": the t test stays undefined.
    runs, metrics = _tables_from_values({"base": {0: 0.8, 1: 0.8}, "other": {0: 0.9, 1: 0.9}})
    row = compare.compare_to_baseline(metrics, runs).iloc[0]
    assert not row["exact"] and not row["significant"] and row["verdict"] == "n.s."


def test_memory_time_unpaired_ratio():
    tests = _memory_time_tests(n_seeds=3, device=GPU, variant_seeds={("memory_time", "qlora"): [10, 11, 12]})
    row = tests.set_index(["variant", "metric"]).loc[("qlora", "median_step_time")]
    assert not row["paired"] and row["test"] == "Welch t"
    assert row["ratio_ci_low"] < MEMORY_TIME_PLANTED["qlora"][1] < row["ratio_ci_high"]


def test_cost_summary_per_variant():
    runs, metrics = make_tables(["methods", "memory_time"], n_seeds=3, device=GPU, failed=["memory_time/full/seed2"])
    cost = cost_summary(runs, metrics)
    assert list(cost.columns) == COST_SUMMARY_COLUMNS
    assert list(cost["variant"]) == ["lora", "qlora", "full"] and set(cost["family"]) == {"memory_time"}
    by = cost.set_index("variant")
    assert list(by["method"]) == ["lora", "qlora", "full"]
    assert by.loc["qlora", "model"] == "tiny-llama" and by.loc["qlora", "targets"] == "query+value"
    assert by.loc["qlora", "seq_length"] == "128" and by.loc["qlora", "optimizer"] == "adamw"
    assert (by["memory_metric"] == "peak_cuda_allocated").all() and by.loc["lora", "is_baseline"]
    assert by.loc["full", "n"] == 2 and by.loc["full", "n_failed"] == 1
    # The same numbers as the summary table.
    summary = summarize(metrics, "peak_cuda_allocated", "none").set_index("variant")
    for column in ("mean", "ci_low", "ci_high"):
        assert by.loc["qlora", f"memory_{column}"] == pytest.approx(summary.loc["qlora", column])
    assert by.loc["qlora", "memory_ci_low"] < by.loc["qlora", "memory_mean"] < by.loc["qlora", "memory_ci_high"]
    assert by.loc["qlora", "state_bytes_mean"] == pytest.approx(6e8)
    assert (by["median_step_time_mean"] > 0).all() and (by["tokens_per_second_mean"] > 0).all()


def test_study_without_any_accuracy(tmp_path):
    """Only a memory_time family: stats run, the accuracy-based tables are empty but well-formed."""
    runs, metrics = make_tables(["memory_time"], n_seeds=3)
    assert not (metrics["metric"] == "accuracy").any()
    runs.to_parquet(tmp_path / "runs.parquet")
    metrics.to_parquet(tmp_path / "metrics.parquet")
    stats.run_stats(tmp_path / "metrics.parquet", tmp_path / "runs.parquet", tmp_path)
    seeds = pd.read_parquet(tmp_path / "seed_consistency.parquet")
    assert seeds.empty and list(seeds.columns) == power.SEED_CONSISTENCY_COLUMNS
    tests = pd.read_parquet(tmp_path / "tests.parquet")
    assert len(tests) and tests["ratio"].notna().all() and not tests["metric"].isin(["accuracy", "loss"]).any()
    summary = pd.read_parquet(tmp_path / "summary.parquet")
    assert "accuracy" not in set(summary["metric"]) and summary["mean"].notna().all()
    assert len(pd.read_parquet(tmp_path / "cost_summary.parquet")) == 3


def test_memory_time_family_whose_runs_all_failed():
    spec = memory_time_family()
    failed = [f"memory_time/{v}/seed{s}" for v in spec.variants for s in (0, 1)]
    runs, metrics = make_tables(["methods", spec], n_seeds=2, failed=failed)
    tests = stats.all_tests(metrics, runs)
    assert not (tests["family"] == "memory_time").any()  # no rows of NaN for a family that measured nothing
    cost = cost_summary(runs, metrics)
    assert (cost["n"] == 0).all() and (cost["n_failed"] == 2).all() and cost["memory_mean"].isna().all()


# ----------------------------------------------------------------------------------------------------
# Numerical failures become NaN and a named note on that row; the other numbers and rows are kept


def _raises(error):
    def raise_it(*args, **kwargs):
        raise error

    return raise_it


def test_ratio_interval_overflow_is_a_note_not_an_exception():
    huge, ordinary = np.array([1e200, 1.2e200, 0.8e200]), np.array([1.0, 1.01, 0.99])
    for paired in (False, True):
        ratio, low, high, note = compare.ratio_interval(huge, ordinary, paired=paired)
        assert ratio == pytest.approx(1e200) and math.isnan(low) and math.isnan(high)
        assert note == "ratio interval not computable (OverflowError)"
    runs, metrics = _tables_from_values({"base": dict(enumerate(ordinary)), "huge": dict(enumerate(huge)),
                                         "v1": {0: 1.1, 1: 1.12, 2: 1.09}}, metric="state_bytes")
    tests = compare.compare_to_baseline(metrics, runs, "state_bytes", "none").set_index("variant")
    assert "ratio interval not computable" in tests.loc["huge", "note"]
    assert np.isfinite(tests.loc["v1", ["ratio", "ratio_ci_low", "ratio_ci_high", "p_value"]].to_numpy(float)).all()


@pytest.mark.parametrize(
    ("target", "error", "column", "note"),
    [
        ((compare.optimize, "brentq"), ValueError("f(a) and f(b) must have different signs"), "effect_ci_low",
         "effect-size interval not computable"),
        ((compare.optimize, "brentq"), RuntimeError("Failed to converge after 100 iterations"), "effect_ci_high",
         "effect-size interval not computable"),
        ((scipy_stats, "wilcoxon"), ValueError("zero_method"), "p_nonparametric", "Wilcoxon test failed (ValueError)"),
        ((scipy_stats, "ttest_rel"), FloatingPointError("overflow"), "p_value", "t test failed (FloatingPointError)"),
    ],
)
def test_paired_comparison_failures_leave_nan_and_a_note(monkeypatch, target, error, column, note):
    runs, metrics = _tables_from_values({"base": BASE, "variant": VARIANT})
    before = compare.compare_to_baseline(metrics, runs).iloc[0]
    monkeypatch.setattr(*target, _raises(error))
    row = compare.compare_to_baseline(metrics, runs).iloc[0]
    assert math.isnan(row[column]) and note in row["note"]
    kept = [c for c in ("diff", "ratio", "ratio_ci_low", "p_value", "p_nonparametric", "effect_size") if c != column]
    assert row[kept].tolist() == pytest.approx(before[kept].tolist())


def test_unpaired_rank_test_failure_leaves_nan_and_a_note(monkeypatch):
    runs, metrics = _tables_from_values({"base": BASE, "variant": {s + 10: v for s, v in VARIANT.items()}})
    monkeypatch.setattr(scipy_stats, "mannwhitneyu", _raises(ValueError("x and y must not be empty")))
    row = compare.compare_to_baseline(metrics, runs).iloc[0]
    assert not row["paired"] and math.isnan(row["p_nonparametric"]) and "Mann-Whitney U test failed" in row["note"]
    assert math.isfinite(row["p_value"]) and math.isfinite(row["effect_ci_low"])


def test_bootstrap_failure_falls_back_to_the_t_interval(monkeypatch):
    values = np.array(list(BASE.values()))
    monkeypatch.setattr(scipy_stats, "bootstrap", _raises(ValueError("degenerate")))
    low, high, method, t_low, t_high = _mean_interval(values)
    assert method == "t (bootstrap failed)" and (low, high) == (t_low, t_high) and low < values.mean() < high


def test_power_search_failure_is_noted_in_seed_consistency(monkeypatch):
    from statsmodels.stats.power import TTestIndPower

    runs, metrics = _tables_from_values({"base": BASE, "variant": VARIANT})
    monkeypatch.setattr(TTestIndPower, "power", _raises(ZeroDivisionError("float division by zero")))
    table = power.seed_consistency(metrics, runs).set_index("variant")
    assert table["seeds_for_1pt"].isna().all()
    assert (table["note"] == "unpaired: power search failed (ZeroDivisionError)").all()
    assert math.isfinite(table.loc["variant", "seeds_for_1pt_paired"]) and table["std"].notna().all()


def _with_peft_twin(runs: pd.DataFrame, metrics: pd.DataFrame, factor: float):
    """The memory_time family's lora runs again as lora-peft (method.impl peft), every cost ``factor`` x ours
    (tokens/s divided by it)."""
    twin_runs = runs[(runs["family"] == "memory_time") & (runs["variant"] == "lora")].copy()
    twin_runs["variant"], twin_runs["is_baseline"] = "lora-peft", False
    twin_runs["run_id"] = twin_runs["run_id"].str.replace("/lora/", "/lora-peft/")
    twin_runs["cfg.method.impl"] = "peft"
    twin_metrics = metrics[(metrics["family"] == "memory_time") & (metrics["variant"] == "lora")].copy()
    twin_metrics["variant"] = "lora-peft"
    twin_metrics["run_id"] = twin_metrics["run_id"].str.replace("/lora/", "/lora-peft/")
    faster = twin_metrics["metric"].isin(["tokens_per_second", "examples_per_second"])
    twin_metrics.loc[faster, "value"] /= factor
    twin_metrics.loc[~faster, "value"] *= factor
    runs = pd.concat([runs.assign(**{"cfg.method.impl": None}), twin_runs], ignore_index=True)
    return runs, pd.concat([metrics, twin_metrics], ignore_index=True)


def test_cost_summary_shows_ours_over_peft_with_intervals():
    runs, metrics = _with_peft_twin(*make_tables(["memory_time"], n_seeds=3, device=GPU), factor=1.25)
    assert peft_counterparts(runs[runs["family"] == "memory_time"]) == {"lora": "lora-peft"}
    cost = cost_summary(runs, metrics).set_index("variant")
    assert list(cost.columns) == COST_SUMMARY_COLUMNS[:2] + COST_SUMMARY_COLUMNS[3:]
    assert cost.loc["lora", "impl"] == "ours" and cost.loc["lora-peft", "impl"] == "peft"
    assert cost.loc["lora", "peft_variant"] == "lora-peft" and cost.loc["qlora", "peft_variant"] == ""
    for prefix, expected in (("memory", 0.8), ("median_step_time", 0.8), ("tokens_per_second", 1.25)):
        ratio = cost.loc["lora", f"{prefix}_ours_over_peft"]
        assert ratio == pytest.approx(expected)
        # Paired on seed: the twin's values are ours times a constant, so the interval is the ratio itself.
        assert cost.loc["lora", f"{prefix}_ours_over_peft_ci_low"] == pytest.approx(expected)
        assert cost.loc["lora", f"{prefix}_ours_over_peft_ci_high"] == pytest.approx(expected)
    assert cost.loc[["qlora", "lora-peft"], "memory_ours_over_peft"].isna().all()


def test_ours_over_peft_interval_covers_a_noisy_ratio():
    runs, metrics = _with_peft_twin(*make_tables(["memory_time"], n_seeds=5, device=GPU), factor=1.0)
    noisy = (metrics["variant"] == "lora-peft") & (metrics["metric"] == "median_step_time")
    metrics.loc[noisy, "value"] *= np.random.default_rng(0).normal(1.0, 0.05, noisy.sum())
    row = cost_summary(runs, metrics).set_index("variant").loc["lora"]
    low, high = row["median_step_time_ours_over_peft_ci_low"], row["median_step_time_ours_over_peft_ci_high"]
    assert low < row["median_step_time_ours_over_peft"] < high and low < 1.0 < high


def test_one_seed_gives_the_ratio_without_an_interval():
    runs, metrics = _with_peft_twin(*make_tables(["memory_time"], n_seeds=1, device=GPU), factor=1.1)
    row = cost_summary(runs, metrics).set_index("variant").loc["lora"]
    assert row["median_step_time_ours_over_peft"] == pytest.approx(1 / 1.1)
    assert math.isnan(row["median_step_time_ours_over_peft_ci_low"])

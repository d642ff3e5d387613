"""Data and train seeds, variance components and the sweep that checks its own winner (lora_bench.analysis.variance).

Synthetic tables with known truth: planted variance components must lie inside their intervals; a sweep of
configurations with equal true accuracy must show a positive optimism for its winner and no real
differences after re-running; a sweep with one planted better configuration must find it again.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from lora_bench import SCHEMA_VERSION
from lora_bench.analysis import compare, power, stats, variance
from lora_bench.analysis.summary import ALPHA, select_values
from lora_bench.analysis.tables import LABEL_COLUMNS, collect, write_tables
from lora_bench.cli import main
from lora_bench.config import ConfigError
from lora_bench.report import figures, render
from lora_bench.study import study_from_dict

ROOT = Path(__file__).resolve().parents[1]


# ----------------------------------------------------------------------------------------------------
# Synthetic tables


def _rows(family: str, kind: str, variant: str, setting: str, data_seed: int, train_seed: int, accuracy: dict,
          stage: str = "", baseline: bool = False) -> tuple[dict, list[dict]]:
    labels = {"run_id": f"{family}/{variant}/seed{train_seed}", "family": family, "family_kind": kind,
              "variant": variant, "seed": train_seed, "is_baseline": baseline, "status": "ok", "method": "lora",
              "data_seed": data_seed, "train_seed": train_seed, "setting": setting, "sweep_stage": stage}
    metrics = [
        {**labels, "metric": "accuracy", "split": split, "epoch": 1, "stage": "final", "value": value,
         "unit": "fraction", "higher_is_better": True}
        for split, value in accuracy.items()
    ]
    metrics.append({**labels, "metric": "loss", "split": "validation", "epoch": 1, "stage": "epoch",
                    "value": 1 - accuracy["validation"], "unit": "nats", "higher_is_better": False})
    return {**labels, "error": ""}, metrics


def _frames(rows: list[tuple[dict, list[dict]]]) -> tuple[pd.DataFrame, pd.DataFrame]:
    runs = pd.DataFrame([r for r, _ in rows])
    metrics = pd.DataFrame([m for _, ms in rows for m in ms])
    metrics["epoch"] = metrics["epoch"].astype("Int64")
    return runs, metrics


def variance_tables(sd_data: float, sd_train: float, sd_resid: float, n_data: int, n_train: int, seed: int = 0,
                    settings: tuple[str, ...] = ("lora",)):
    rng = np.random.default_rng(seed)
    rows = []
    for setting in settings:
        a, b = rng.normal(0, sd_data, n_data), rng.normal(0, sd_train, n_train)
        for d in range(n_data):
            for t in range(n_train):
                value = 0.8 + a[d] + b[t] + rng.normal(0, sd_resid)
                rows.append(_rows("var", "variance", f"{setting}-data{d}", setting, d, t,
                                  {"validation": value, "test": value}))
    return _frames(rows)


def sweep_tables(true: dict[str, float], noise: float, top_k: int, rerun_data: int, rerun_train: int,
                 seed: int = 0, sd_data: float = 0.003):
    """A sweep of ``true`` accuracies, one run each, then re-runs of the top k chosen by ``select_sweep``."""
    rng = np.random.default_rng(seed)
    split_effect = rng.normal(0, sd_data, rerun_data + 1)  # data seed 0 is the sweep's

    def draw(config, d):
        return {s: true[config] + split_effect[d] + rng.normal(0, noise) for s in ("validation", "test")}

    sweep = [_rows("sw", "sweep", c, c, 0, 0, draw(c, 0), "sweep", i == 0) for i, c in enumerate(true)]
    runs, metrics = _frames(sweep)
    selection = variance.select_sweep(runs, metrics, "sw", top_k)
    reruns = [_rows("sw", "sweep", f"{c}-data{d}", c, d, t, draw(c, d), "rerun")
              for c in selection["selected"] for d in range(1, rerun_data + 1) for t in range(1, rerun_train + 1)]
    runs, metrics = _frames(sweep + reruns)
    return runs, metrics, selection


# ----------------------------------------------------------------------------------------------------
# Variance components


PLANTED = {"data": 0.02, "train": 0.006, "residual": 0.01}


def test_planted_variance_components_lie_in_their_intervals():
    runs, metrics = variance_tables(PLANTED["data"], PLANTED["train"], PLANTED["residual"], n_data=10, n_train=6)
    row = variance.variance_components(runs, metrics, resamples=100).iloc[0]
    assert row["n_runs"] == 60 and row["n_data_seeds"] == 10 and row["n_train_seeds"] == 6
    for name, sd in PLANTED.items():
        assert row[f"sd_{name}_ci_low"] <= sd <= row[f"sd_{name}_ci_high"], name
        assert row[f"sd_{name}_ci_low"] <= row[f"sd_{name}"] <= row[f"sd_{name}_ci_high"], name
    share = PLANTED["data"] ** 2 / sum(v**2 for v in PLANTED.values())
    assert row["share_data_ci_low"] <= share <= row["share_data_ci_high"]
    assert row["share_data"] + row["share_train"] == pytest.approx(1)
    assert row["share_train_ci_low"] == pytest.approx(1 - row["share_data_ci_high"])
    assert "REML" in row["method"] and "bootstrap" in row["method"]


def test_no_split_effect_gives_a_data_share_interval_from_zero():
    runs, metrics = variance_tables(0.0, 0.0, 0.01, n_data=5, n_train=4, seed=3)
    row = variance.variance_components(runs, metrics, resamples=60).iloc[0]
    assert row["sd_data_ci_low"] == pytest.approx(0, abs=1e-6)
    assert row["share_data_ci_low"] == pytest.approx(0, abs=1e-6)
    assert row["sd_residual_ci_low"] <= 0.01 <= row["sd_residual_ci_high"]


def test_variance_components_per_setting_and_degenerate_cases():
    runs, metrics = variance_tables(0.02, 0.0, 0.01, n_data=3, n_train=3, settings=("lora", "full"))
    table = variance.variance_components(runs, metrics, resamples=20)
    assert list(table["setting"]) == ["lora", "full"] and list(table.columns) == variance.VARIANCE_COLUMNS
    one_seed = variance.fit_variance_components(pd.DataFrame({"value": [0.8, 0.81], "data_seed": [0, 1],
                                                              "train_seed": [0, 0]}))
    assert "at least two" in one_seed["note"]
    flat = variance.fit_variance_components(pd.DataFrame({"value": [0.8] * 4, "data_seed": [0, 0, 1, 1],
                                                          "train_seed": [0, 1, 0, 1]}))
    assert flat["sd_total"] == 0 and "same value" in flat["note"]


# ----------------------------------------------------------------------------------------------------
# Degenerate designs: REML's failure is replaced by the ANOVA estimator, never raised


def _fail_reml(monkeypatch) -> None:
    """Make every REML fit (point estimate and resamples) raise as it does on some processors."""

    def singular(frame):
        raise np.linalg.LinAlgError("Singular matrix")

    monkeypatch.setattr(variance, "_reml", singular)


def _design(values: np.ndarray) -> pd.DataFrame:
    """One run per (data seed, train seed) cell of ``values[d, t]``."""
    n_data, n_train = values.shape
    return pd.DataFrame({"value": values.ravel(), "data_seed": np.repeat(np.arange(n_data), n_train),
                         "train_seed": np.tile(np.arange(n_train), n_data)})


# 3 x 3: data effects 2 * (-1, 0, 1), train effects (-1, 0, 1) and an interaction orthogonal to both, in
# units of 0.01. By hand: MS_data = 3 * 8 / 2 = 12, MS_train = 3 * 2 / 2 = 3, MS_error = 4 / 4 = 1, so
# s2_data = (12 - 1) / 3, s2_train = (3 - 1) / 3 and s2_resid = 1 (times 0.01^2).
HAND_EFFECTS = (2 * np.array([-1.0, 0, 1])[:, None] + np.array([-1.0, 0, 1])[None, :]
                + np.array([[1.0, -1, 0], [-1, 1, 0], [0, 0, 0]]))
HAND_SD = {"data": 0.01 * math.sqrt(11 / 3), "train": 0.01 * math.sqrt(2 / 3), "residual": 0.01}


def test_reml_raising_falls_back_to_the_hand_computed_anova(monkeypatch):
    _fail_reml(monkeypatch)
    row = variance.fit_variance_components(_design(0.8 + 0.01 * HAND_EFFECTS), resamples=20)
    for name, sd in HAND_SD.items():
        assert row[f"sd_{name}"] == pytest.approx(sd, rel=1e-9), name
        assert np.isfinite([row[f"sd_{name}_ci_low"], row[f"sd_{name}_ci_high"]]).all(), name
    total = sum(sd**2 for sd in HAND_SD.values())
    assert row["sd_total"] == pytest.approx(math.sqrt(total), rel=1e-9)
    assert row["share_data"] == pytest.approx(HAND_SD["data"] ** 2 / total, rel=1e-9)
    assert math.isfinite(row["share_data_ci_low"]) and math.isfinite(row["share_data_ci_high"])
    assert row["method"].startswith("ANOVA method of moments") and "REML failed" in row["method"]
    assert "REML raised LinAlgError (Singular matrix); ANOVA (method of moments) estimates used" in row["note"]
    assert "REML failed on 20 of 20 resamples; ANOVA estimates used for 20" in row["note"]


def test_reml_not_converging_or_non_finite_falls_back_too(monkeypatch):
    reml = variance._reml
    for result, reason in ((lambda f: (*reml(f)[:4], False), "did not converge"),
                           (lambda f: (0.0, math.nan, 0.1, 0.2, True), "non-finite")):
        monkeypatch.setattr(variance, "_reml", result)
        row = variance.fit_variance_components(_design(0.8 + 0.01 * HAND_EFFECTS), resamples=5)
        assert row["sd_data"] == pytest.approx(HAND_SD["data"], rel=1e-9) and reason in row["note"]
        assert "ANOVA" in row["method"] and "REML failed on 5 of 5 resamples" in row["note"]


def test_a_failed_resample_is_counted_and_the_rest_stay_reml(monkeypatch):
    calls = []

    def every_third_fails(frame):
        calls.append(1)
        if len(calls) > 1 and len(calls) % 3 == 0:  # the point estimate (call 1) succeeds
            raise np.linalg.LinAlgError("Singular matrix")
        return (0.0, *variance.anova_components(frame), True)  # a stand-in REML that works on every processor

    monkeypatch.setattr(variance, "_reml", every_third_fails)
    runs, metrics = variance_tables(0.02, 0.006, 0.01, n_data=4, n_train=4)
    row = variance.variance_components(runs, metrics, resamples=12).iloc[0]
    assert row["method"].startswith("REML") and row["note"].startswith("REML failed on 4 of 12 resamples")
    assert np.isfinite(row[["sd_data_ci_low", "sd_data_ci_high", "share_data_ci_low"]].to_numpy(float)).all()


def test_anova_recovers_planted_components_balanced_and_unbalanced():
    rng = np.random.default_rng(11)
    n_data, n_train, sd = 60, 40, {"data": 2.0, "train": 1.0, "residual": 1.5}
    values = (rng.normal(0, sd["data"], n_data)[:, None] + rng.normal(0, sd["train"], n_train)[None, :]
              + rng.normal(0, sd["residual"], (n_data, n_train)))
    balanced = _design(values).rename(columns={"value": "y"})
    # Unbalanced: a fifth of the cells missing, and some cells run twice.
    dropped = balanced.sample(frac=0.8, random_state=1)
    repeats = dropped.head(100).assign(y=lambda f: f["y"] + rng.normal(0, sd["residual"], len(f)))
    for frame in (balanced, pd.concat([dropped, repeats], ignore_index=True)):
        s2_data, s2_train, s2_resid = variance.anova_components(frame)
        assert s2_data == pytest.approx(sd["data"] ** 2, rel=0.3)
        assert s2_train == pytest.approx(sd["train"] ** 2, rel=0.4)
        assert s2_resid == pytest.approx(sd["residual"] ** 2, rel=0.1)


def test_anova_equals_reml_on_a_balanced_design_with_interior_estimates():
    runs, metrics = variance_tables(PLANTED["data"], PLANTED["train"], PLANTED["residual"], n_data=10, n_train=6)
    frame = _ok_frame(metrics)
    anova = np.array(variance.anova_components(frame))
    reml = np.array(variance._reml(frame)[1:4])
    assert (anova > 0).all()  # interior: nothing truncated, where the two estimators coincide
    np.testing.assert_allclose(reml, anova, rtol=1e-3)


def _ok_frame(metrics: pd.DataFrame) -> pd.DataFrame:
    frame = select_values(metrics, "accuracy", "test")[["value", "data_seed", "train_seed"]]
    frame = frame.reset_index(drop=True)
    return frame.assign(y=(frame["value"] - frame["value"].mean()) / frame["value"].std())


def _degenerate(case: str) -> pd.DataFrame:
    """Designs with planted exact zeros (values on a grid of 0.01, so every run on every processor sees them)."""
    a, b = np.array([-2.0, 0, 1, 1]), np.array([1.0, -1, 0, 2, -2])
    e = np.random.default_rng(5).integers(-2, 3, (4, 5)).astype(float)
    effects = {"zero_data": b[None, :] + e, "zero_train": a[:, None] + e, "zero_residual": a[:, None] + b[None, :],
               "constant": np.zeros((4, 5)), "single_data_seed": (a[:, None] + b[None, :] + e)[:1]}[case]
    return _design(0.8 + 0.01 * effects)


@pytest.mark.parametrize("reml_fails", [False, True], ids=["reml", "reml-raises"])
@pytest.mark.parametrize("case", ["zero_data", "zero_train", "zero_residual", "constant", "single_data_seed"])
def test_degenerate_designs_give_a_finite_row_and_a_note(case, reml_fails, monkeypatch):
    if reml_fails:
        _fail_reml(monkeypatch)
    row = variance.fit_variance_components(_degenerate(case), resamples=10)
    if case == "constant":
        assert row["sd_total"] == 0 and "same value" in row["note"]
        return
    if case == "single_data_seed":
        assert "at least two" in row["note"] and "sd_data" not in row
        return
    sds = [row[f"sd_{name}"] for name in ("data", "train", "residual", "total")]
    assert np.isfinite(sds).all() and np.isfinite([row["share_data"], row["share_train"]]).all()
    assert np.isfinite([row["sd_residual_ci_low"], row["sd_residual_ci_high"]]).all()
    assert ("ANOVA" in row["method"]) == ("REML raised" in row["note"] or "REML put" in row["note"])
    if reml_fails:
        assert "ANOVA" in row["method"] and "REML raised LinAlgError" in row["note"]
    if case == "zero_residual":
        # Exactly additive: the residual is 0 and the others are the plain variances of the planted effects.
        assert row["sd_residual"] == pytest.approx(0, abs=1e-9)
        assert "residual component at the boundary 0" in row["note"] and "ANOVA" in row["method"]
        assert row["sd_data"] == pytest.approx(0.01 * np.std([-2.0, 0, 1, 1], ddof=1), rel=1e-6)


def test_a_setting_whose_reml_fails_keeps_its_row_and_the_others_stay_reml(monkeypatch):
    runs, metrics = variance_tables(0.02, 0.01, 0.01, n_data=6, n_train=5, settings=("lora", "full"))
    calls = []

    def first_fit_fails(frame):  # the first call is the point estimate of the first setting
        calls.append(1)
        if len(calls) == 1:
            raise np.linalg.LinAlgError("Singular matrix")
        # A stand-in REML that succeeds on every processor (it equals REML on interior balanced designs).
        return (0.0, *variance.anova_components(frame), True)

    monkeypatch.setattr(variance, "_reml", first_fit_fails)
    table = variance.variance_components(runs, metrics, resamples=5).set_index("setting")
    assert table[["sd_data", "sd_train", "sd_residual", "share_data"]].notna().all().all()
    assert table.loc["lora", "method"].startswith("ANOVA") and "REML raised" in table.loc["lora", "note"]
    assert table.loc["full", "method"].startswith("REML") and "REML" not in table.loc["full", "note"]


# ----------------------------------------------------------------------------------------------------
# Sweep: selection and re-evaluation


def test_selection_by_validation_accuracy_ties_broken_by_loss_then_order():
    rows = [_rows("sw", "sweep", c, c, 0, 0, {"validation": v, "test": 0.5}, "sweep")
            for c, v in (("a", 0.80), ("b", 0.85), ("c", 0.85), ("d", 0.70))]
    rows[2][1][-1]["value"] = 0.1  # c: same accuracy as b, lower validation loss
    runs, metrics = _frames(rows)
    selection = variance.select_sweep(runs, metrics, "sw", top_k=3)
    assert selection["winner"] == "c" and selection["selected"] == ["c", "b", "a"]
    assert [r["rank"] for r in selection["ranking"]] == [1, 2, 3, 4]
    assert selection["metric"] == "accuracy" and selection["split"] == "validation"


EQUAL = {f"cfg{i:02d}": 0.80 for i in range(40)}


def test_equal_configurations_winner_is_optimistic_and_reruns_show_no_difference():
    runs, metrics, selection = sweep_tables(EQUAL, noise=0.02, top_k=5, rerun_data=4, rerun_train=2, seed=1)
    reeval, summary = variance.sweep_tables(runs, metrics)
    val = summary.set_index("split").loc["validation"]
    assert val["winner"] == selection["winner"] and val["top_k"] == 5 and val["n_reruns"] == 40
    # The best of 40 single runs sits about two noise SDs above its true accuracy.
    assert val["optimism"] > 0.02 and val["optimism_ci_low"] > 0
    assert val["topk_optimism"] > 0 and val["topk_optimism_ci_low"] > 0
    assert val["differ_p"] > ALPHA and not val["differ"]
    assert val["p_winner_best"] < 0.6
    winner = reeval[(reeval["split"] == "validation") & reeval["is_winner"]].iloc[0]
    assert winner["sweep_rank"] == 1 and winner["in_top_k"]
    assert winner["optimism"] == pytest.approx(winner["sweep_score"] - winner["rerun_mean"])
    assert winner["optimism_ci_low"] == pytest.approx(winner["sweep_score"] - winner["rerun_ci_high"])
    # Configurations that were not re-run keep their sweep score and have no re-run numbers.
    rest = reeval[~reeval["in_top_k"]]
    assert len(rest) == 2 * 35 and rest["rerun_mean"].isna().all() and rest["n_rerun"].eq(0).all()


def test_planted_better_configuration_is_found_by_the_reruns():
    true = {f"cfg{i:02d}": 0.80 for i in range(20)}
    true["cfg13"] = 0.86
    runs, metrics, selection = sweep_tables(true, noise=0.02, top_k=4, rerun_data=4, rerun_train=2, seed=2)
    assert "cfg13" in selection["selected"]
    _, summary = variance.sweep_tables(runs, metrics)
    for split in ("validation", "test"):
        row = summary.set_index("split").loc[split]
        assert row["rerun_best"] == "cfg13", split
        assert row["differ"] and row["differ_p"] < 0.01, split
    reeval, _ = variance.sweep_tables(runs, metrics)
    planted = reeval[(reeval["setting"] == "cfg13") & (reeval["split"] == "validation")].iloc[0]
    assert planted["p_best"] > 0.95 and planted["rerun_rank"] == 1
    assert planted["rerun_ci_low"] <= 0.86 + 0.01 and planted["rerun_ci_high"] >= 0.86 - 0.01


def test_sweep_slope_and_f_test_failures_are_noted_and_the_rest_kept(monkeypatch):
    import statsmodels.stats.anova

    def raises(*args, **kwargs):
        raise np.linalg.LinAlgError("SVD did not converge")

    runs, metrics, _ = sweep_tables(EQUAL, noise=0.02, top_k=4, rerun_data=3, rerun_train=2, seed=1)
    _, before = variance.sweep_tables(runs, metrics, resamples=200)
    assert before["slope"].notna().all() and before["differ_p"].notna().all() and before["note"].eq("").all()
    monkeypatch.setattr(np, "polyfit", raises)
    monkeypatch.setattr(statsmodels.stats.anova, "anova_lm", raises)
    reeval, summary = variance.sweep_tables(runs, metrics, resamples=200)
    assert summary["slope"].isna().all() and summary["differ_p"].isna().all() and not summary["differ"].any()
    assert summary["note"].str.contains("slope not computable \\(LinAlgError\\)").all()
    assert summary["note"].str.contains("F test of configuration failed \\(LinAlgError").all()
    kept = ["optimism", "topk_optimism", "topk_optimism_ci_low", "p_winner_best"]
    pd.testing.assert_frame_equal(summary[kept], before[kept])
    assert len(reeval) == 2 * len(EQUAL)


def test_sweep_slope_of_numerically_constant_scores_is_nan_with_a_note():
    # Sweep scores one ulp apart: np.ptp > 0, but x and the intercept column are collinear to machine precision.
    x = np.array([1.0, 1.0 + 2.0**-52, 1.0])
    slope, note = variance._slope(x, np.array([0.7, 0.71, 0.72]))
    assert math.isnan(slope) and note == "slope not computable (RankWarning)"
    assert variance._slope(np.array([0.1, 0.2, 0.3]), np.array([1.0, 2.0, 3.0]))[0] == pytest.approx(10)


def test_stats_tables_are_written_empty_without_such_families(tmp_path):
    runs, metrics = variance_tables(0.01, 0.0, 0.01, n_data=2, n_train=2)
    runs["family_kind"] = metrics["family_kind"] = "generic"
    runs.to_parquet(tmp_path / "runs.parquet")
    metrics.to_parquet(tmp_path / "metrics.parquet")
    written = variance.run_variance_stats(tmp_path / "runs.parquet", tmp_path / "metrics.parquet", tmp_path)
    for name, columns in (("variance_components", variance.VARIANCE_COLUMNS), ("sweep_reeval", variance.REEVAL_COLUMNS),
                          ("sweep_summary", variance.SUMMARY_COLUMNS)):
        table = pd.read_parquet(written[name])
        assert table.empty and list(table.columns) == columns


def test_generic_tests_and_seed_table_leave_these_kinds_out():
    runs, metrics = variance_tables(0.01, 0.0, 0.01, n_data=2, n_train=3)
    assert compare.compare_to_baseline(metrics, runs).empty
    assert power.seed_consistency(metrics, runs).empty


# ----------------------------------------------------------------------------------------------------
# Figures and report


def test_figures_are_registered_and_draw(tmp_path):
    assert figures.FIGURES["variance"] is figures.plot_variance and figures.FIGURES["sweep"] is figures.plot_sweep
    runs_v, metrics_v = variance_tables(0.02, 0.0, 0.01, n_data=3, n_train=3, settings=("lora", "last_layers"))
    runs_s, metrics_s, _ = sweep_tables(EQUAL, noise=0.02, top_k=4, rerun_data=3, rerun_train=1)
    runs, metrics = pd.concat([runs_v, runs_s]), pd.concat([metrics_v, metrics_s])
    made = figures.make_all_figures(runs, metrics, tmp_path)
    assert {m["kind"] for m in made} == {"variance", "sweep"}
    assert all(m["png"].stat().st_size > 10_000 for m in made)
    assert "identity line" in figures.figure_caption("sweep")


def test_report_has_the_trust_section(tmp_path, monkeypatch):
    monkeypatch.setattr(variance, "VC_RESAMPLES", 30)  # the numbers are not what this test checks
    runs_v, metrics_v = variance_tables(0.02, 0.0, 0.01, n_data=3, n_train=3)
    runs_s, metrics_s, selection = sweep_tables(EQUAL, noise=0.02, top_k=3, rerun_data=3, rerun_train=1)
    tables = tmp_path / "tables"
    tables.mkdir()
    # Synthetic tables, stamped as the collect step stamps real ones.
    runs, metrics = pd.concat([runs_v, runs_s]), pd.concat([metrics_v, metrics_s])
    runs["schema_version"] = metrics["schema_version"] = SCHEMA_VERSION
    write_tables(runs, metrics, tables)
    assert main(["stats", "--tables", str(tables)]) == 0
    assert main(["figures", "--tables", str(tables), "--out-dir", str(tmp_path / "figures")]) == 0
    paths = render.build_report(tables, tmp_path / "figures", tmp_path / "paper")
    text = paths["markdown"].read_text()
    assert "## How much to trust a single run" in text
    assert "**optimism**" in text and selection["winner"] in text
    assert "| var | lora | 3 × 3 (9 runs) |" in text
    assert "## Family: var" not in text and "## Family: sw" not in text  # shown in the trust section instead
    assert text.count("](../figures/") == 2
    assert paths["html"].read_text().count("data:image/png;base64,") == 2


def test_report_without_trust_tables_names_the_command(tmp_path):
    runs, metrics = variance_tables(0.02, 0.0, 0.01, n_data=2, n_train=2)
    runs.to_parquet(tmp_path / "runs.parquet")
    metrics.to_parquet(tmp_path / "metrics.parquet")
    stats.run_stats(tmp_path / "metrics.parquet", tmp_path / "runs.parquet", tmp_path)
    with pytest.raises(FileNotFoundError, match="lora_bench stats"):
        render.build_report(tmp_path, tmp_path, tmp_path)


# ----------------------------------------------------------------------------------------------------
# Study: seeds, variants and re-runs


def _study(**families) -> dict:
    return {"name": "t", "seeds": [0, 1], "base": {"data": {"split_seed": 7}},
            "families": families or {"methods": {"baseline": "lora", "variants": {"lora": {}}}}}


SWEEP_BLOCK = {"kind": "sweep", "baseline": "rank2", "seeds": [0], "grid": {"method.lora.rank": [2, 4, 8]},
               "sweep": {"top_k": 2, "rerun_seeds": [1, 2], "rerun_data_seeds": [1, 2, 3]}}


def test_data_seeds_cross_train_seeds_and_keep_other_families_unchanged():
    plain = study_from_dict(_study())
    study = study_from_dict(_study(
        methods={"baseline": "lora", "variants": {"lora": {}}},
        var={"kind": "variance", "baseline": "lora", "data_seeds": [3, 4], "variants": {"lora": {}, "full": {}}},
    ))
    # A family without data_seeds: same runs, configs and labels as before (nothing re-runs).
    assert plain.run_config("methods", "lora", 1) == study.run_config("methods", "lora", 1)
    assert plain.labels("methods", "lora", 1) == {"family": "methods", "family_kind": "methods", "variant": "lora",
                                                  "seed": 1, "is_baseline": True, "study": "t"}
    assert [r for r in study.runs() if r[0] == "var"] == [
        ("var", v, s) for v in ("lora-data3", "lora-data4", "full-data3", "full-data4") for s in (0, 1)]
    cfg = study.run_config("var", "full-data4", 1)
    assert cfg.data.split_seed == 4 and cfg.seed == 1
    labels = study.labels("var", "lora-data3", 0)
    assert labels["setting"] == "lora" and labels["data_seed"] == 3 and labels["train_seed"] == 0
    assert labels["is_baseline"] and "sweep_stage" not in labels
    assert {spec["data"]["split_seed"] for spec in study.data_preparations().values()} == {7, 3, 4}


def test_sweep_reruns_are_resolved_up_front_and_listed_from_a_selection():
    study = study_from_dict(_study(sweep=SWEEP_BLOCK))
    assert study.runs() == [("sweep", v, 0) for v in ("rank2", "rank4", "rank8")]
    assert study.sweep_families() == ["sweep"]
    reruns = study.rerun_runs("sweep", ["rank8", "rank2"])
    assert len(reruns) == 2 * 3 * 2 and reruns[0] == ("sweep", "rank8-data1", 1)
    cfg = study.run_config("sweep", "rank8-data3", 2)
    assert cfg.method.lora.rank == 8 and cfg.data.split_seed == 3 and cfg.seed == 2
    assert study.labels("sweep", "rank8-data3", 2)["sweep_stage"] == "rerun"
    labels = study.labels("sweep", "rank4", 0)
    assert (labels["sweep_stage"], labels["setting"], labels["data_seed"]) == ("sweep", "rank4", 7)
    assert {spec["data"]["split_seed"] for spec in study.data_preparations().values()} == {7, 1, 2, 3}
    with pytest.raises(ConfigError, match="no configuration"):
        study.rerun_runs("sweep", ["rank16"])


@pytest.mark.parametrize(
    ("change", "message"),
    [
        ({"sweep": {"top_k": 9, "rerun_seeds": [1], "rerun_data_seeds": [1]}}, "top_k"),
        ({"sweep": {"rerun_seeds": [0], "rerun_data_seeds": [1]}}, "fresh seeds"),
        ({"sweep": {"rerun_seeds": [1], "rerun_data_seeds": [7]}}, "fresh data seeds"),
        ({"data_seeds": [1, 2]}, "rerun_data_seeds"),
        ({"sweep": None}, "needs a `sweep` block"),
        ({"kind": "generic"}, "only allowed"),
        ({"sweep": {"rerun_seeds": [1]}}, "rerun_data_seeds"),
    ],
)
def test_bad_sweep_blocks_are_named_errors(change, message):
    block = {**SWEEP_BLOCK, **change}
    if block.get("sweep") is None:
        block.pop("sweep")
    with pytest.raises(ConfigError, match=message):
        study_from_dict(_study(sweep=block))


def test_variance_family_needs_two_data_and_train_seeds():
    with pytest.raises(ConfigError, match="two data_seeds"):
        study_from_dict(_study(var={"kind": "variance", "baseline": "lora", "data_seeds": [1],
                                    "variants": {"lora": {}}}))


# ----------------------------------------------------------------------------------------------------
# Records, tables and the select-sweep command


def _record(path: Path, run: dict, config: dict, validation: float, test: float) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps({
        "schema_version": SCHEMA_VERSION, "run": run, "config": config, "status": "ok", "error": None,
        "metrics": {"epochs": [{"epoch": 1, "train_loss": 0.5, "validation_accuracy": validation,
                                "validation_loss": 1 - validation, "test_accuracy": test}],
                    "final": {"validation_accuracy": validation, "test_accuracy": test}, "selected_epoch": 1},
    }))


def test_tables_carry_both_seeds_also_for_records_without_the_labels(tmp_path):
    old = {"family": "methods", "family_kind": "methods", "variant": "lora", "seed": 3, "is_baseline": True}
    _record(tmp_path / "old.json", old, {"seed": 3, "data": {"split_seed": 5}}, 0.8, 0.7)
    new = {**old, "variant": "lora-data2", "setting": "lora", "data_seed": 2, "train_seed": 3}
    _record(tmp_path / "new.json", new, {"seed": 3, "data": {"split_seed": 2}}, 0.8, 0.7)
    runs, metrics = collect([tmp_path / "old.json", tmp_path / "new.json"])
    assert set(LABEL_COLUMNS) <= set(metrics.columns) and set(LABEL_COLUMNS) <= set(runs.columns)
    by_id = runs.set_index("run_id")
    assert by_id.loc["methods/lora/seed3", ["data_seed", "train_seed", "setting"]].tolist() == [5, 3, "lora"]
    assert by_id.loc["methods/lora-data2/seed3", ["data_seed", "setting", "sweep_stage"]].tolist() == [2, "lora", ""]


def test_train_records_data_and_train_seed(tiny_run, tmp_path):
    tiny_run["data"]["split_seed"] = 4
    tiny_run["seed"] = 2
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_run))
    out = tmp_path / "record.json"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 0
    run = json.loads(out.read_text())["run"]
    assert run["data_seed"] == 4 and run["train_seed"] == 2


def test_select_sweep_command_writes_the_selection(tmp_path):
    paths = []
    for i, (config, val) in enumerate((("rank2", 0.7), ("rank4", 0.9), ("rank8", 0.8))):
        run = {"family": "sweep", "family_kind": "sweep", "variant": config, "seed": 0, "is_baseline": i == 0,
               "setting": config, "data_seed": 0, "train_seed": 0, "sweep_stage": "sweep"}
        paths.append(tmp_path / f"{config}.json")
        _record(paths[-1], run, {"seed": 0}, val, 0.5)
    out = tmp_path / "selection.json"
    assert main(["select-sweep", "--family", "sweep", "--top-k", "2", "--records", *map(str, paths),
                 "--out", str(out)]) == 0
    selection = json.loads(out.read_text())
    assert selection["winner"] == "rank4" and selection["selected"] == ["rank4", "rank8"]


# ----------------------------------------------------------------------------------------------------
# The workflow: the checkpoint expands to the re-run jobs


def test_checkpoint_expands_to_the_rerun_jobs(tmp_path):
    sys.path.insert(0, str(ROOT / "tests"))
    from test_workflow import planned_jobs, snakemake

    config = yaml.safe_load((ROOT / ".test/config.yaml").read_text())
    config["families"] = {"sweep": config["families"]["sweep"]}
    (tmp_path / "study.yaml").write_text(yaml.safe_dump(config, sort_keys=False))
    common = ("-s", str(ROOT / "Snakefile"), "--directory", str(tmp_path), "--configfile",
              str(tmp_path / "study.yaml"))
    before = planned_jobs(snakemake("-n", *common).stdout)
    assert before["train"] == 4 and before["select_sweep"] == 1 and before["collect"] == 1

    # The sweep stage "ran" (records written by hand), so only the selection and what follows remain.
    study = study_from_dict(config)
    (tmp_path / "results/data").mkdir(parents=True)
    for key in study.data_preparations():
        (tmp_path / f"results/data/{key}.done").write_text("done\n")
    for i, (family, variant, seed) in enumerate(study.runs()):
        _record(tmp_path / f"results/runs/{family}/{variant}/seed{seed}.json", study.labels(family, variant, seed),
                study.run_config(family, variant, seed).to_dict(), 0.6 + 0.01 * i, 0.6)
    snakemake("results/sweep/sweep/selection.json", "--cores", "1", *common)
    selection = json.loads((tmp_path / "results/sweep/sweep/selection.json").read_text())
    assert len(selection["selected"]) == 2
    after = planned_jobs(snakemake("-n", *common).stdout)
    sweep = config["families"]["sweep"]["sweep"]
    assert after["train"] == 2 * len(sweep["rerun_seeds"]) * len(sweep["rerun_data_seeds"])
    assert "select_sweep" not in after
    planned = snakemake("-n", *common).stdout
    for config_name in selection["selected"]:
        assert f"results/runs/sweep/{config_name}-data1/seed1.json" in planned
    assert not math.isnan(selection["ranking"][0]["score"])

"""Tuning with an equal budget (lora_bench.analysis.tuning, study `tune` blocks, the select_tune checkpoint)."""

from __future__ import annotations

import copy
import json
import math
import re
import shutil

import numpy as np
import pandas as pd
import pytest
import yaml
from reliability_helpers import jobs_run, mini_study, snakemake

from lora_bench.analysis.tuning import (
    TIE_BREAKS,
    chosen_edges,
    select_tuned,
    selection,
    tie_rules,
    tuning_scores,
    tuning_table,
)
from lora_bench.config import ConfigError, RunConfig
from lora_bench.report.sections.findings import _tuning_caveat
from lora_bench.report.sections.tune import tune_section
from lora_bench.run.tasks import ClassificationTask
from lora_bench.run.train import run_training
from lora_bench.study import study_from_dict

VALUES = [1.0e-4, 3.0e-4, 1.0e-3, 3.0e-3, 1.0e-2]


def _tuning_frames(best: dict[str, float], seeds=(100, 101), noise=0.005, seed=0, failed=()):
    """Planted response curves: each variant's validation accuracy peaks at its ``best`` learning rate
    (a parabola in log10 lr), plus noise; ``failed`` = (variant, value) pairs whose runs failed."""
    rng = np.random.default_rng(seed)
    runs, metrics = [], []
    for variant, peak in best.items():
        for value in VALUES:
            for s in seeds:
                run_id = f"m_tune/{variant}-lr{value:g}/seed{s}"
                ok = (variant, value) not in failed
                runs.append({"run_id": run_id, "family": "m_tune", "family_kind": "tune", "variant": f"{variant}-lr",
                             "seed": s, "setting": variant, "status": "ok" if ok else "failed", "tunes": "m",
                             "tune_key": "train.lr", "tune_value": value, "tune_metric": "validation_accuracy",
                             "cfg.train.epochs": 3, "cfg.train.max_steps": None})
                if ok:
                    score = 0.85 - 0.04 * (math.log10(value) - math.log10(peak)) ** 2 + rng.normal(0, noise)
                    metrics.append({"run_id": run_id, "family": "m_tune", "variant": f"{variant}-lr",
                                    "setting": variant, "seed": s, "status": "ok", "metric": "accuracy",
                                    "split": "validation", "epoch": 3, "stage": "final", "value": score,
                                    "unit": "fraction", "higher_is_better": True})
    metrics = pd.DataFrame(metrics)
    metrics["epoch"] = metrics["epoch"].astype("Int64")
    return pd.DataFrame(runs), metrics


def test_planted_response_curves_pick_each_variants_own_best_value():
    best = {"lora": 1.0e-3, "full": 1.0e-4, "last_layers": 1.0e-2}
    runs, metrics = _tuning_frames(best)
    scores = tuning_scores(runs, metrics, "m_tune", "validation_accuracy")
    assert len(scores) == 3 * len(VALUES) and (scores["n_runs"] == 2).all()
    assert select_tuned(scores) == best
    tune = {"key": "train.lr", "values": VALUES, "seeds": [100, 101], "metric": "validation_accuracy"}
    chosen = selection(runs, metrics, "m", tune)
    assert chosen["chosen"] == best and chosen["tuning_family"] == "m_tune"
    table = tuning_table(runs, metrics)
    assert table.loc[table["chosen"], ["setting", "value"]].set_index("setting")["value"].to_dict() == best
    assert (table["epochs"] == 3).all() and (table["family"] == "m").all()


def test_a_value_chosen_at_an_end_of_its_grid_is_flagged_in_table_selection_and_findings():
    best = {"lora": 1.0e-3, "full": 3.0e-5, "last_layers": 3.0e-2}  # inside, below and above VALUES
    runs, metrics = _tuning_frames(best, noise=0)
    table = tuning_table(runs, metrics)
    edges = table.drop_duplicates("setting").set_index("setting")["chosen_edge"].to_dict()
    assert edges == {"lora": "", "full": "low", "last_layers": "high"}
    tune = {"key": "train.lr", "values": VALUES, "seeds": [100, 101], "metric": "validation_accuracy"}
    assert selection(runs, metrics, "m", tune)["chosen_edge"] == edges
    tests = pd.DataFrame({"variant": ["full", "last_layers"], "baseline": "lora"})
    caveats = [_tuning_caveat({"tuning": table}, "m", t) for _, t in tests.iterrows()]
    assert "full's tuned train.lr (0.0001, validation 83.91 % vs 81.00 % at 0.0003) is the smallest value" in caveats[0]
    assert "may lie above" in caveats[1] and "lora" not in caveats[1].split(";")[0].split("'s")[0]
    inside = pd.Series({"variant": "lora", "baseline": "lora"})
    assert _tuning_caveat({"tuning": table}, "m", inside) == ""
    # Still at the end after tune.extend widened that end: the caveat says how far the grid was widened.
    widened = table.assign(extension=(table["setting"] == "last_layers") & (table["value"] == VALUES[-1]))
    assert "largest value of its grid (widened by 1 step(s) of tune.extend)" in _tuning_caveat(
        {"tuning": widened}, "m", tests.iloc[1])
    # A flat end (the smallest value ties its neighbour and wins by the tie rule) is not an edge.
    flat = pd.DataFrame({"setting": "a", "value": [3e-3, 1e-2, 3e-2], "mean": [0.715, 0.715, 0.6975]})
    assert chosen_edges(flat, {"a": 3e-3}) == {"a": ""}
    assert chosen_edges(flat.assign(mean=[0.72, 0.715, 0.6975]), {"a": 3e-3}) == {"a": "low"}


def test_a_tie_goes_to_the_lower_validation_loss_or_by_rule_to_the_smaller_value_and_failed_values_never_win():
    scores = pd.DataFrame({"setting": ["a"] * 3 + ["b"] * 2 + ["c"] * 2 + ["d"] * 2,
                           "value": [3e-4, 1e-3, 3e-3, 1e-3, 3e-3, 1e-3, 3e-3, 1e-3, 3e-3],
                           "n_runs": 1, "n_failed": 0,
                           # b: a failed value; c: a tied value without a loss; d: equal up to float rounding
                           "mean": [0.9, 0.9, 0.8, math.nan, 0.7, 0.9, 0.9, 0.1 + 0.2, 0.3], "std": math.nan,
                           "loss": [0.30, 0.20, 0.10, math.nan, 0.5, math.nan, 0.25, 0.4, 0.3]})
    assert select_tuned(scores, "loss") == {"a": 1e-3, "b": 3e-3, "c": 3e-3, "d": 3e-3}
    assert select_tuned(scores, "smaller") == {"a": 3e-4, "b": 3e-3, "c": 1e-3, "d": 1e-3}
    # Without any loss (an older table), the loss rule falls back to the smaller value.
    assert select_tuned(scores.drop(columns="loss"), "loss") == select_tuned(scores, "smaller")
    assert select_tuned(scores.assign(loss=math.nan), "loss") == select_tuned(scores, "smaller")
    with pytest.raises(ValueError, match=r"unknown tune.tie_break 'median'; known: \['loss', 'smaller', 'trained'\]"):
        select_tuned(scores, "median")
    # A tie at an end is not an edge, whichever value the tie-break chose.
    assert chosen_edges(scores, {"a": 1e-3, "c": 3e-3, "d": 3e-3}) == {"a": "", "b": "", "c": "", "d": ""}
    runs, metrics = _tuning_frames({"lora": 1.0e-3}, failed={("lora", 1.0e-3)}, noise=0)
    assert selection(runs, metrics, "m", {"key": "train.lr", "values": VALUES, "seeds": [100, 101],
                                          "metric": "validation_accuracy"})["chosen"]["lora"] in (3.0e-4, 3.0e-3)
    runs["status"] = "failed"
    with pytest.raises(ValueError, match="no tuning run of variant"):
        selection(runs, metrics.iloc[0:0], "m", {"key": "train.lr", "values": VALUES, "seeds": [100],
                                                   "metric": "validation_accuracy"})


def _tied_frames(tie_break: str | None, loss_stage: str = "epoch"):
    """Two tuning values of one variant with the same validation accuracy on both seeds; the larger one has
    the lower validation loss at the selected epoch (epoch 2) but the higher one at epoch 1. ``loss_stage``:
    where the loss is recorded ("epoch": a classifier's per-epoch rows; "final": a causal LM's final block)."""
    runs, metrics = [], []
    for value, losses in ((1e-3, {1: 0.40, 2: 0.35}), (3e-3, {1: 0.50, 2: 0.30}), (1e-2, {1: 0.6, 2: 0.6})):
        for seed in (100, 101):
            run_id = f"m_tune/lora-lr{value:g}/seed{seed}"
            runs.append({"run_id": run_id, "family": "m_tune", "family_kind": "tune", "variant": f"lora-lr{value:g}",
                         "seed": seed, "setting": "lora", "status": "ok", "tunes": "m", "tune_key": "train.lr",
                         "tune_value": value, "tune_metric": "validation_accuracy", "cfg.train.epochs": 2,
                         "cfg.train.max_steps": None, **({"tune_tie_break": tie_break} if tie_break else {})})
            row = {"run_id": run_id, "family": "m_tune", "variant": f"lora-lr{value:g}", "setting": "lora",
                   "seed": seed, "status": "ok", "split": "validation", "unit": "fraction", "higher_is_better": True}
            metrics.append({**row, "metric": "accuracy", "epoch": 2, "stage": "final",
                            "value": 0.5 if value == 1e-2 else 0.75 + 0.05 * (seed - 100)})
            for epoch, loss in losses.items():
                if loss_stage == "epoch" or epoch == 2:
                    metrics.append({**row, "metric": "loss", "epoch": epoch,
                                    "stage": loss_stage if epoch == 2 else "epoch", "value": loss})
    metrics = pd.DataFrame(metrics)
    metrics["epoch"] = metrics["epoch"].astype("Int64")
    return pd.DataFrame(runs), metrics


@pytest.mark.parametrize("loss_stage", ["epoch", "final"])
def test_the_tie_break_reads_each_runs_validation_loss_at_its_selected_epoch(loss_stage):
    runs, metrics = _tied_frames("loss", loss_stage)
    scores = tuning_scores(runs, metrics, "m_tune", "validation_accuracy").set_index("value")
    assert scores["loss"].to_dict() == pytest.approx({1e-3: 0.35, 3e-3: 0.30, 1e-2: 0.6})
    tune = {"key": "train.lr", "values": [1e-3, 3e-3, 1e-2], "seeds": [100, 101], "metric": "validation_accuracy"}
    chosen = selection(runs, metrics, "m", {**tune, "tie_break": "loss"})
    assert chosen["chosen"] == {"lora": 3e-3} and chosen["tied"] == {"lora": [1e-3, 3e-3]}
    assert chosen["rule"].endswith("ties to the lower mean validation loss at the selected epochs")
    assert chosen["losses"]["lora"]["0.003"] == pytest.approx(0.30)
    assert selection(runs, metrics, "m", {**tune, "tie_break": "smaller"})["chosen"] == {"lora": 1e-3}
    # A tune block without tie_break (the workflow's --tune-json) takes the rule the tuning runs are labelled
    # with, as the tuning table does: the two can never disagree (they did, when the selection used the default).
    assert selection(runs, metrics, "m", tune)["chosen"] == {"lora": 3e-3}
    assert selection(runs, metrics, "m", tune)["tie_break"] == "loss"
    # Records made before tune.tie_break carry no label: the smaller value, the rule they were selected by.
    legacy, legacy_metrics = _tied_frames(None, loss_stage)
    assert selection(legacy, legacy_metrics, "m", tune)["chosen"] == {"lora": 1e-3}


def test_the_default_tie_break_takes_the_value_whose_tuning_runs_trained_then_the_smaller():
    """``trained`` (the default) differs from ``smaller`` only where the smaller value's tuning runs had not trained
    (here: still improving, not levelled off) and the larger's had; a value without diagnostics wins nothing."""
    runs, metrics = _tied_frames("trained")
    # 1e-3 and 3e-3 tie; 1e-3's runs are still improving at the end of the budget, 3e-3's levelled off.
    runs["trained"] = pd.Series([value != 1e-3 for value in runs["tune_value"]], dtype=object)
    scores = tuning_scores(runs, metrics, "m_tune", "validation_accuracy").set_index("value")
    assert scores["trained"].to_dict() == {1e-3: 0.0, 3e-3: 1.0, 1e-2: 1.0}
    tune = {"key": "train.lr", "values": [1e-3, 3e-3, 1e-2], "seeds": [100, 101], "metric": "validation_accuracy"}
    chosen = selection(runs, metrics, "m", tune)
    assert chosen["chosen"] == {"lora": 3e-3} and chosen["tie_break"] == "trained"
    assert chosen["rule"].endswith("ties to the value whose tuning runs trained (learned and levelled off), then "
                                   "the smaller value")
    assert chosen["trained"]["lora"] == {"0.001": 0.0, "0.003": 1.0, "0.01": 1.0}
    assert selection(runs, metrics, "m", {**tune, "tie_break": "smaller"})["chosen"] == {"lora": 1e-3}
    # One of 1e-3's two runs trained: still behind a value both of whose runs did.
    runs.loc[runs["run_id"] == "m_tune/lora-lr0.001/seed100", "trained"] = True
    assert selection(runs, metrics, "m", tune)["chosen"] == {"lora": 3e-3}
    # Both trained: the smaller value, as `smaller` takes it.
    runs["trained"] = pd.Series(True, index=runs.index, dtype=object)
    assert selection(runs, metrics, "m", tune)["chosen"] == {"lora": 1e-3}
    # A run without diagnostics (a record made before them) leaves its value's flag unknown: it loses the tie to
    # a value whose runs trained, and where no flag is known the smaller value wins.
    runs.loc[runs["run_id"] == "m_tune/lora-lr0.003/seed101", "trained"] = None
    assert selection(runs, metrics, "m", tune)["chosen"] == {"lora": 1e-3}
    assert selection(runs.drop(columns="trained"), metrics, "m", tune)["chosen"] == {"lora": 1e-3}
    # The table and the report say which values trained.
    runs["trained"] = pd.Series([value != 1e-3 for value in runs["tune_value"]], dtype=object)
    runs.loc[runs["run_id"] == "m_tune/lora-lr0.01/seed101", "trained"] = False
    table = tuning_table(runs, metrics)
    assert table.loc[table["chosen"], "value"].tolist() == [3e-3] and (table["tie_break"] == "trained").all()
    section = tune_section("m_tune", {"tuning": table, "runs": runs})
    assert {row["value"]: row["trained"] for row in section["rows"]} == {"0.001": "no", "0.003": "yes",
                                                                        "0.01": "partly (50 %)"}
    assert section["rows"][1]["chosen"] == ("**chosen** (tied with 0.001; broken by the value whose tuning runs "
                                            "trained (learned and levelled off), then the smaller value)")
    # Where both trained, the report says the smaller value decided, and why.
    runs["trained"] = pd.Series(True, index=runs.index, dtype=object)
    section = tune_section("m_tune", {"tuning": tuning_table(runs, metrics), "runs": runs})
    assert section["rows"][0]["chosen"] == ("**chosen** (tied with 0.003; broken by the smaller value (their tuning "
                                            "runs trained alike))")
    comparison = pd.Series({"variant": "lora", "baseline": "full"})
    assert "trained (learned and levelled off)" not in _tuning_caveat({"tuning": tuning_table(runs, metrics)}, "m",
                                                                      comparison)
    # Where none of the chosen value's tuning runs trained, every comparison of the variant says the choice was
    # made on runs still moving at the end of the budget (the tie-break cannot help there).
    runs["trained"] = pd.Series(False, index=runs.index, dtype=object)
    caveat = _tuning_caveat({"tuning": tuning_table(runs, metrics)}, "m", comparison)
    assert ("lora's tuned train.lr (0.001) was chosen on tuning runs of which none trained (learned and levelled "
            "off), so a longer tuning budget might choose another value") in caveat
    assert "broken by the smaller value (their tuning runs trained alike)" in caveat


def test_the_tuning_table_and_the_report_name_a_tie_and_the_rule_that_broke_it():
    runs, metrics = _tied_frames("loss")
    table = tuning_table(runs, metrics)
    assert table.set_index("value")["tied"].to_dict() == {1e-3: True, 3e-3: True, 1e-2: False}
    assert table.loc[table["chosen"], "value"].tolist() == [3e-3] and (table["tie_break"] == "loss").all()
    section = tune_section("m_tune", {"tuning": table, "runs": runs})
    assert section["tie_break"] == "the lower mean validation loss at the selected epochs"
    marks = {row["value"]: row["chosen"] for row in section["rows"]}
    assert marks["0.003"] == ("**chosen** (tied with 0.001; broken by the lower mean validation loss at the "
                              "selected epochs)") and marks["0.001"] == ""
    assert {row["value"]: row["loss"] for row in section["rows"]}["0.003"] == "0.3000"
    # Values read in ascending order per variant, whatever order the table holds them in.
    assert [row["value"] for row in tune_section("m_tune", {"tuning": table.iloc[::-1], "runs": runs})["rows"]] \
        == ["0.001", "0.003", "0.01"]
    caveat = _tuning_caveat({"tuning": table}, "m", pd.Series({"variant": "lora", "baseline": "full"}))
    assert ("lora's tuned train.lr (0.003, validation 77.50 %) tied with 0.001; broken by the lower mean "
            "validation loss") in caveat
    # Records made before tune.tie_break carry no label: they were selected by the smaller value, and the
    # table says so rather than re-selecting them by a rule they were not run under.
    legacy, legacy_metrics = _tied_frames(None)
    old = tuning_table(legacy, legacy_metrics)
    assert old.loc[old["chosen"], "value"].tolist() == [1e-3] and (old["tie_break"] == "smaller").all()
    assert "tied with 0.003; broken by the smaller value" in _tuning_caveat(
        {"tuning": old}, "m", pd.Series({"variant": "lora", "baseline": "full"}))


def test_tie_break_is_a_label_of_the_tuning_runs_never_part_of_what_they_train():
    for_default = _study({"key": "train.lr", "values": [1.0e-3, 1.0e-2], "seeds": [100]})
    for_loss = _study({"key": "train.lr", "values": [1.0e-3, 1.0e-2], "seeds": [100], "tie_break": "loss"})
    assert for_default.labels("methods_tune", "lora-lr0.001", 100)["tune_tie_break"] == "trained"  # the default
    assert for_loss.labels("methods_tune", "lora-lr0.001", 100)["tune_tie_break"] == "loss"
    assert set(for_loss.trained_configs()) == set(for_default.trained_configs())
    with pytest.raises(ConfigError, match="tie_break"):
        _study({"key": "train.lr", "values": [1.0e-3, 1.0e-2], "seeds": [100], "tie_break": "median"})
    schema = yaml.safe_load(open("lora_bench/schemas/study.schema.yaml").read())
    tune_schema = schema["properties"]["families"]["additionalProperties"]["properties"]["tune"]
    assert sorted(tune_schema["properties"]["tie_break"]["enum"]) == sorted(TIE_BREAKS)


def test_a_tuning_run_never_evaluates_the_test_split(tiny_run, monkeypatch):
    seen = []
    original = ClassificationTask.evaluate

    def spy(self, model, split):
        seen.append(split)
        return original(self, model, split)

    monkeypatch.setattr(ClassificationTask, "evaluate", spy)
    tiny_run["train"].update(evaluate_test=False, epochs=2)
    result = run_training(RunConfig.from_dict(tiny_run))
    assert "test" not in seen and "validation" in seen
    assert not any(k.startswith("test_") for e in result.metrics["epochs"] for k in e)
    assert not any(k.startswith("test_") for k in result.metrics["final"])


def _study(tune: dict, seeds=(0, 1)):
    variants = {"lora": {}, "full": {"method": {"name": "full"}}}
    base = {"model": {"source": "random", "name": "tiny-bert"}}
    return study_from_dict({"name": "t", "seeds": list(seeds), "base": base,
                            "families": {"methods": {"baseline": "lora", "tune": tune, "variants": variants}}})


def test_a_selection_made_for_another_grid_is_a_named_error_not_a_missing_training(tmp_path):
    study = _study({"key": "train.lr", "factors": [0.3, 1, 3], "seeds": [100]})
    selection = tmp_path / "selection.json"
    selection.write_text(json.dumps({"chosen": {"lora": 0.001 * 0.3, "full": 0.009}}))
    assert study.tuned_value("methods", "lora", selection) == 3.0e-4  # the grid's own float, so the key matches
    with pytest.raises(ConfigError, match=r"selection.json: family 'methods' variant 'full' was tuned to 0.009, "
                                          r"which is not in its current grid"):
        study.tuned_value("methods", "full", selection)
    selection.write_text("{")
    with pytest.raises(ConfigError, match="forcerun select_tune"):
        study.tuned_value("methods", "lora", selection)


def test_a_tune_block_adds_a_tuning_family_with_the_same_grid_for_every_variant():
    study = _study({"key": "train.lr", "values": [1.0e-3, 1.0e-2], "seeds": [100]})
    tuning = study.families["methods_tune"]
    assert tuning.kind == "tune" and tuning.seeds == (100,)
    assert sorted(tuning.variants) == ["full-lr0.001", "full-lr0.01", "lora-lr0.001", "lora-lr0.01"]
    cfg = study.run_config("methods_tune", "full-lr0.01", 100)
    assert cfg.train.lr == 0.01 and cfg.train.evaluate_test is False and cfg.method.name == "full"
    assert study.run_config("methods", "full", 0, 0.01).train.lr == 0.01
    assert study.labels("methods_tune", "full-lr0.01", 100)["tune_value"] == 0.01
    # Every value x variant x seed of the tuned family is a possible training, planned up front.
    keys = {study.run_key("methods", v, s, x) for v in ("lora", "full") for s in (0, 1) for x in (1e-3, 1e-2)}
    assert keys <= set(study.trained_configs())
    with pytest.raises(ConfigError, match="fresh seeds"):
        _study({"key": "train.lr", "values": [1.0e-3, 1.0e-2], "seeds": [1]})


def test_tuning_through_the_workflow_then_the_family_runs_at_the_chosen_values(tmp_path):
    """Through Snakemake, with tie rules that are not the defaults: a tie margin wide enough that every value
    ties, broken by the lower loss. The selection the family runs are made from, the tuning table and the
    report then agree on the rule and the value (the selection once ignored a configured tie_break)."""
    workdir = tmp_path / "tuned"
    path = mini_study(workdir)
    config = yaml.safe_load(path.read_text())
    config["families"]["methods"]["tune"] = {"key": "train.lr", "values": [1.0e-3, 3.0e-2], "seeds": [100],
                                             "tie_break": "loss", "tie_margin": 1.0}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    done = snakemake(workdir, "--cores", "2", "results/tables/tuning.parquet")
    jobs = jobs_run(done)
    assert jobs["select_tune"] == 1 and "tune_round" not in jobs  # no extension rounds without tune.extend
    selection_file = json.loads((workdir / "results/tune/methods/selection.json").read_text())
    chosen = selection_file["chosen"]
    assert set(chosen) == {"lora", "last_layers"} and set(chosen.values()) <= {1.0e-3, 3.0e-2}
    runs = pd.read_parquet(workdir / "results/tables/runs.parquet")
    family = runs[runs["family"] == "methods"]
    assert len(family) == 4 and len(runs[runs["family"] == "methods_tune"]) == 4
    for variant, lr in family[["variant", "cfg.train.lr"]].itertuples(index=False):
        assert lr == chosen[variant], variant
    metrics = pd.read_parquet(workdir / "results/tables/metrics.parquet")
    tuning_rows = metrics[metrics["family"] == "methods_tune"]
    assert not (tuning_rows["split"] == "test").any(), "a tuning run evaluated the test split"
    table = pd.read_parquet(workdir / "results/tables/tuning.parquet")
    assert table["chosen"].sum() == 2
    assert selection_file["tie_break"] == "loss" and selection_file["tie_margin"] == 1.0
    assert selection_file["tied"] == {"lora": [1.0e-3, 3.0e-2], "last_layers": [1.0e-3, 3.0e-2]}
    assert table["tied"].all() and (table["tie_break"] == "loss").all() and (table["tie_margin"] == 1.0).all()
    for setting, rows in table.groupby("setting"):
        lowest_loss = rows.sort_values("loss")["value"].iloc[0]
        assert chosen[setting] == lowest_loss == rows.loc[rows["chosen"], "value"].item(), setting


def test_a_stale_selection_is_named_and_forcerun_selects_again(tmp_path):
    """A selection of another grid (a copied results folder: no Snakemake metadata to re-run it) stops the
    workflow naming the file and the way out; `--forcerun select_tune` then selects again at the new values."""
    workdir = tmp_path / "stale"
    path = mini_study(workdir, seeds=[0])
    config = yaml.safe_load(path.read_text())
    config["families"]["methods"]["tune"] = {"key": "train.lr", "values": [1.0e-3, 3.0e-2], "seeds": [100]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(workdir, "--cores", "2", "results/tables/runs.parquet")
    config["families"]["methods"]["tune"]["values"] = [2.0e-3, 1.0e-2]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    shutil.rmtree(workdir / ".snakemake")
    stopped = snakemake(workdir, "-n", "results/tables/runs.parquet", check=False)
    assert stopped.returncode != 0
    assert "selection.json: family 'methods' variant" in stopped.stdout + stopped.stderr
    assert "not in its current grid" in stopped.stdout + stopped.stderr
    assert "--forcerun select_tune" in stopped.stdout + stopped.stderr
    snakemake(workdir, "--cores", "2", "--forcerun", "select_tune", "--", "results/tables/runs.parquet")
    selection = workdir / "results/tune/methods/selection.json"
    chosen = json.loads(selection.read_text())["chosen"]
    assert set(chosen.values()) <= {2.0e-3, 1.0e-2}
    family = pd.read_parquet(workdir / "results/tables/runs.parquet").query("family == 'methods'")
    assert len(family) == 2
    for variant, lr in family[["variant", "cfg.train.lr"]].itertuples(index=False):
        assert lr == chosen[variant], variant


def test_factors_tune_each_variant_around_its_own_value_with_the_same_budget():
    variants = {"lora": {}, "full": {"method": {"name": "full"}, "train": {"lr": 5.0e-5}}}
    study = study_from_dict({"name": "t", "seeds": [0], "base": {"model": {"source": "random", "name": "tiny-bert"},
                                                                  "train": {"lr": 1.0e-3}},
                             "families": {"methods": {"baseline": "lora", "variants": variants,
                                                      "tune": {"key": "train.lr", "factors": [0.3, 1, 3]}}}})
    grids = study.families["methods"].tune["grids"]
    assert grids == {"lora": [3.0e-4, 1.0e-3, 3.0e-3], "full": [1.5e-5, 5.0e-5, 1.5e-4]}
    assert sorted(study.families["methods_tune"].variants) == [
        "full-lr0.00015", "full-lr1.5e-05", "full-lr5e-05", "lora-lr0.0003", "lora-lr0.001", "lora-lr0.003"]
    with pytest.raises(ConfigError, match="not both or neither"):
        _study({"key": "train.lr", "values": [1.0e-3, 1.0e-2], "factors": [1, 2]})


def test_extend_plans_geometric_steps_beyond_each_end_but_runs_only_the_base_grid():
    study = _study({"key": "train.lr", "factors": [0.3, 1, 3], "seeds": [100], "extend": 2})
    tune = study.families["methods"].tune
    assert tune["base_grids"]["lora"] == [3.0e-4, 1.0e-3, 3.0e-3]
    # The base grid first, in its own order, then the steps below and above it (0.3 / 1 / 3: x0.3 and x3).
    assert tune["grids"]["lora"] == [3.0e-4, 1.0e-3, 3.0e-3, 9.0e-5, 2.7e-5, 9.0e-3, 2.7e-2]
    tuning = study.families["methods_tune"]
    assert sorted(tuning.variants) == ["full-lr0.0003", "full-lr0.001", "full-lr0.003",
                                       "lora-lr0.0003", "lora-lr0.001", "lora-lr0.003"]
    assert sorted(tuning.rerun_variants) == sorted(f"{v}-lr{x}" for v in ("full", "lora")
                                                   for x in ("9e-05", "2.7e-05", "0.009", "0.027"))
    # Only the base grid is a run of the study (a target); every extension is a known config, ready if asked.
    assert {(f, v) for f, v, _ in study.runs() if f == "methods_tune"} == {("methods_tune", v) for v in tuning.variants}
    assert study.run_key("methods_tune", "lora-lr0.027", 100) in study.trained_configs()
    assert study.run_config("methods_tune", "lora-lr0.027", 100).train.evaluate_test is False
    assert study.labels("methods_tune", "lora-lr0.027", 100)["tune_value"] == 0.027
    assert study.run_key("methods", "lora", 1, 0.027) in study.trained_configs()
    # Without extend nothing changes: the grids are the base grids and no variant waits for a round.
    plain = _study({"key": "train.lr", "factors": [0.3, 1, 3], "seeds": [100]})
    assert plain.families["methods"].tune["grids"]["lora"] == [3.0e-4, 1.0e-3, 3.0e-3]
    assert not plain.families["methods_tune"].rerun_variants
    with pytest.raises(ConfigError, match="needs at least two positive values"):
        _study({"key": "train.lr", "values": [0, 1.0e-3], "seeds": [100], "extend": 1})
    with pytest.raises(ConfigError, match="round to values it already has"):
        _study({"key": "train.lr", "values": [1.0e-3, 1.001e-3], "seeds": [100], "extend": 1})


def test_each_extension_round_adds_one_value_beyond_the_end_its_selection_chose(tmp_path):
    study = _study({"key": "train.lr", "factors": [0.3, 1, 3], "seeds": [100, 101], "extend": 2})

    def round_file(name, edges):
        path = tmp_path / name
        path.write_text(json.dumps({"chosen_edge": edges}))
        return path

    def tried(*rounds):
        runs = study.tuning_runs("methods", rounds)
        assert {seed for _, _, seed in runs} == {100, 101}
        return sorted({variant for _, variant, _ in runs})

    base = tried()
    assert base == sorted(study.families["methods_tune"].variants)
    first = round_file("round0.json", {"lora": "high", "full": "low"})
    assert set(tried(first)) - set(base) == {"lora-lr0.009", "full-lr9e-05"}
    # A rate chosen at the new end goes one step further; one chosen inside its values stops there.
    second = round_file("round1.json", {"lora": "high", "full": ""})
    assert set(tried(first, second)) - set(base) == {"lora-lr0.009", "lora-lr0.027", "full-lr9e-05"}
    # Past the planned extend steps there is nothing left to add: never a run the workflow cannot name.
    third = round_file("round2.json", {"lora": "high", "full": "low"})
    assert set(tried(first, second, third)) - set(base) == {"lora-lr0.009", "lora-lr0.027", "full-lr9e-05",
                                                            "full-lr2.7e-05"}
    broken = tmp_path / "broken.json"
    broken.write_text("{")
    with pytest.raises(ConfigError, match="broken.json: not a tuning selection"):
        study.tuning_runs("methods", [broken])


def test_the_workflow_extends_a_grid_only_where_its_best_value_sits_at_an_end(tmp_path):
    """Planted: tiny LoRA learns this data in 8 epochs at 3e-2 but not at 3e-3 (chosen at the high end), while
    last-layers learns at neither (a tie: no edge). The study, two tuned families alike, first runs without
    tune.extend; adding it to the same results makes round 0 ask for LoRA's next step, 0.3, and nothing else, and
    both families' selections, which already existed, are made again from all three LoRA values (Snakemake
    otherwise takes an existing checkpoint output as it is: the second family's was never made again); the
    families run at them."""
    workdir = tmp_path / "extend"
    path = mini_study(workdir, seeds=[0])
    config = yaml.safe_load(path.read_text())
    config["base"]["train"]["epochs"] = 8
    config["families"]["methods"]["tune"] = {"key": "train.lr", "values": [3.0e-3, 3.0e-2], "seeds": [100]}
    config["families"]["again"] = copy.deepcopy(config["families"]["methods"])  # same configs: trained once
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(workdir, "--cores", "2")
    assert not (workdir / "results/tune/methods/round0.json").exists()
    for family in ("methods", "again"):
        config["families"][family]["tune"]["extend"] = 1
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    jobs = jobs_run(snakemake(workdir, "--cores", "2"))
    assert jobs["tune_round"] >= 1 and jobs["select_tune"] >= 1
    round0 = json.loads((workdir / "results/tune/methods/round0.json").read_text())
    assert round0["chosen"]["lora"] == 3.0e-2 and round0["chosen_edge"] == {"lora": "high", "last_layers": ""}
    tuning_runs = workdir / "results/runs/methods_tune"
    assert sorted(p.name for p in tuning_runs.iterdir()) == [
        "last_layers-lr0.003", "last_layers-lr0.03", "lora-lr0.003", "lora-lr0.03", "lora-lr0.3"]
    final = json.loads((workdir / "results/tune/methods/selection.json").read_text())
    assert set(final["scores"]["lora"]) == {"0.003", "0.03", "0.3"}
    again = json.loads((workdir / "results/tune/again/selection.json").read_text())
    assert again["scores"] == final["scores"] and again["chosen"] == final["chosen"]
    table = pd.read_parquet(workdir / "results/tables/tuning.parquet")
    table = table[table["family"] == "methods"]
    assert sorted(table.loc[table["setting"] == "lora", "value"]) == [3.0e-3, 3.0e-2, 0.3]
    assert table.loc[table["extension"], ["setting", "value"]].values.tolist() == [["lora", 0.3]]
    assert table.loc[table["chosen"], "value"].tolist() == [final["chosen"][s] for s in table.loc[table["chosen"],
                                                                                                  "setting"]]
    report = (workdir / "paper/report.md").read_text()
    assert "plus 1 value(s) beyond a grid's end where the value chosen sat there (tune.extend: lora 0.3)" in report
    assert "| lora | 0.3 (extension) |" in report
    runs = pd.read_parquet(workdir / "results/tables/runs.parquet")
    assert (runs["family"] == "methods_tune").sum() == 5 and (runs["family"] == "again_tune").sum() == 5
    for variant, lr in runs.query("family in ['methods', 'again']")[["variant", "cfg.train.lr"]].itertuples(
            index=False):
        assert lr == final["chosen"][variant], variant
    # Nothing left to do: the rounds and the selection are up to date.
    assert not jobs_run(snakemake(workdir, "--cores", "2", "-n"))


def _tie_seed_frames(on_tie_seed: dict[float, float | None]):
    """One variant, three values on tuning seed 100: 1e-3 and 3e-3 tie at 75 % validation, 1e-2 scores 50 %.
    ``on_tie_seed``: value -> its validation score on tie seed 200 (None: that run failed); every value has a
    validation loss, the larger of the tied values the lower one."""
    runs, metrics = [], []
    for value, seed, score in [(1e-3, 100, 0.75), (3e-3, 100, 0.75), (1e-2, 100, 0.5),
                               *((v, 200, s) for v, s in on_tie_seed.items())]:
        run_id = f"m_tune/lora-lr{value:g}/seed{seed}"
        runs.append({"run_id": run_id, "family": "m_tune", "family_kind": "tune", "variant": f"lora-lr{value:g}",
                     "seed": seed, "setting": "lora", "status": "ok" if score is not None else "failed",
                     "tunes": "m", "tune_key": "train.lr", "tune_value": value, "tune_metric": "validation_accuracy",
                     "tune_tie_break": "smaller", "tune_tie_seed": seed == 200, "cfg.train.epochs": 2,
                     "cfg.train.max_steps": None})
        if score is None:
            continue
        row = {"run_id": run_id, "family": "m_tune", "variant": f"lora-lr{value:g}", "setting": "lora",
               "seed": seed, "status": "ok", "split": "validation", "unit": "fraction", "higher_is_better": True,
               "epoch": 2}
        metrics += [{**row, "metric": "accuracy", "stage": "final", "value": score},
                    {**row, "metric": "loss", "stage": "epoch", "value": 0.4 if value == 1e-3 else 0.3}]
    metrics = pd.DataFrame(metrics)
    metrics["epoch"] = metrics["epoch"].astype("Int64")
    return pd.DataFrame(runs), metrics


TIE_TUNE = {"key": "train.lr", "values": [1e-3, 3e-3, 1e-2], "seeds": [100], "metric": "validation_accuracy",
            "tie_seeds": [200]}


def test_tie_seeds_decide_a_tie_by_the_mean_over_the_tuning_and_tie_seeds():
    runs, metrics = _tie_seed_frames({1e-3: 0.70, 3e-3: 0.80})
    scores = tuning_scores(runs, metrics, "m_tune", "validation_accuracy").set_index("value")
    # The comparison across values stays on the tuning seeds, which every value ran on.
    assert scores["n_runs"].to_dict() == {1e-3: 1, 3e-3: 1, 1e-2: 1}
    assert scores["mean"].to_dict() == pytest.approx({1e-3: 0.75, 3e-3: 0.75, 1e-2: 0.5})
    assert scores["n_tie_runs"].to_dict() == {1e-3: 1, 3e-3: 1, 1e-2: 0}
    assert scores["tie_mean"].loc[[1e-3, 3e-3]].tolist() == pytest.approx([0.725, 0.775])
    assert math.isnan(scores["tie_mean"].loc[1e-2])
    chosen = selection(runs, metrics, "m", TIE_TUNE)
    # The smaller value would have won the tie; the tie seed says otherwise.
    assert chosen["chosen"] == {"lora": 3e-3} and chosen["tied"] == {"lora": [1e-3, 3e-3]}
    assert chosen["tie_seeds"] == [200] and chosen["tie_means"] == {"lora": pytest.approx({"0.001": 0.725,
                                                                                             "0.003": 0.775})}
    assert "ties to the best mean over the tuning and tie seeds [200], then the smaller value" in chosen["rule"]
    assert chosen["chosen_edge"] == {"lora": ""}  # a tie is never an edge, whatever decided it


def test_a_tie_the_tie_seeds_repeat_goes_to_the_tie_break_and_a_failed_tie_run_cannot_win():
    runs, metrics = _tie_seed_frames({1e-3: 0.80, 3e-3: 0.80})
    assert selection(runs, metrics, "m", TIE_TUNE)["chosen"] == {"lora": 1e-3}
    assert selection(runs, metrics, "m", {**TIE_TUNE, "tie_break": "loss"})["chosen"] == {"lora": 3e-3}
    runs, metrics = _tie_seed_frames({1e-3: 0.60, 3e-3: None})
    scores = tuning_scores(runs, metrics, "m_tune", "validation_accuracy").set_index("value")
    assert scores.loc[3e-3, "n_tie_runs"] == 1 and math.isnan(scores.loc[3e-3, "tie_mean"])
    assert scores.loc[3e-3, "n_failed"] == 0  # failures on the tie seeds do not count against the tuning seeds
    assert selection(runs, metrics, "m", TIE_TUNE)["chosen"] == {"lora": 1e-3}
    # Before the tie round ran (no tie-seed runs yet) the tie-break decides alone.
    runs, metrics = _tie_seed_frames({})
    assert selection(runs, metrics, "m", {**TIE_TUNE, "tie_break": "loss"})["chosen"] == {"lora": 3e-3}


def test_the_report_says_what_the_tie_seeds_decided():
    runs, metrics = _tie_seed_frames({1e-3: 0.70, 3e-3: 0.80})
    table = tuning_table(runs, metrics)
    row = table.set_index("value")
    assert row["n_tie_runs"].to_dict() == {1e-3: 1, 3e-3: 1, 1e-2: 0} and row.loc[3e-3, "chosen"]
    section = tune_section("m_tune", {"tuning": table, "runs": runs})
    cells = {r["value"]: r for r in section["rows"]}
    assert cells["0.003"]["chosen"] == ("**chosen** (tied with 0.001 on the tuning seeds; decided by 1 tie seed(s): "
                                        "77.50 % over the tuning and tie seeds vs 72.50 % at 0.001)")
    assert cells["0.003"]["score"] == "75.00 (77.50 with its 1 tie-seed run(s))" and cells["0.01"]["score"] == "50.00"
    assert cells["0.003"]["n"] == 1  # finished runs on the tuning seeds
    assert "1 tuning seed(s), plus 2 run(s) of the values tied at the top on 1 tie seed(s)" in section["budget"]
    assert section["tie_seeds"] == "the best mean over the tuning and tie seeds, then "
    caveat = _tuning_caveat({"tuning": table}, "m", pd.Series({"variant": "lora", "baseline": "full"}))
    assert "lora's tuned train.lr (0.003, validation 75.00 %) tied with 0.001 on the tuning seeds; decided by" \
        in caveat
    runs, metrics = _tie_seed_frames({1e-3: 0.80, 3e-3: 0.80})
    again = tune_section("m_tune", {"tuning": tuning_table(runs, metrics), "runs": runs})
    assert {r["value"]: r["chosen"] for r in again["rows"]}["0.001"] == (
        "**chosen** (tied with 0.003 on the tuning seeds and again with 1 tie seed(s) (77.50 %); broken by the "
        "smaller value)")


def test_tie_seeds_are_fresh_seeds_labelled_on_their_runs_and_planned_for_every_value(tmp_path):
    tune = {"key": "train.lr", "factors": [0.3, 1, 3], "seeds": [100], "extend": 1, "tie_seeds": [200, 201]}
    study = _study(tune)
    assert study.tune_rounds("methods") == 2  # the extension round, then the tie round
    assert _study({**tune, "tie_seeds": []}).tune_rounds("methods") == 1
    tuning = study.families["methods_tune"]
    # Every value, extensions included, may tie: each is a known config on each tie seed.
    for variant in [*tuning.variants, *tuning.rerun_variants]:
        for seed in (200, 201):
            assert study.run_key("methods_tune", variant, seed) in study.trained_configs()
    assert study.labels("methods_tune", "lora-lr0.001", 200)["tune_tie_seed"] is True
    assert "tune_tie_seed" not in study.labels("methods_tune", "lora-lr0.001", 100)  # old records keep their labels
    # Only the tied values the tie round lists run on the tie seeds (and only values the study has tried).
    edges = tmp_path / "round0.json"
    edges.write_text(json.dumps({"chosen_edge": {"lora": "high", "full": ""}}))
    ties = tmp_path / "round1.json"
    ties.write_text(json.dumps({"tied": {"lora": [0.003, 0.009], "full": [5.0, 6.0]}}))
    extra = set(study.tuning_runs("methods", [edges], ties)) - set(study.tuning_runs("methods", [edges]))
    assert extra == {("methods_tune", f"lora-lr{v}", s) for v in ("0.003", "0.009") for s in (200, 201)}
    ties.write_text(json.dumps({"tied": ["lora"]}))
    with pytest.raises(ConfigError, match="round1.json: not a tuning selection with tied"):
        study.tuning_runs("methods", [edges], ties)
    for reused in ([100], [1]):
        with pytest.raises(ConfigError, match=r"tune.tie_seeds \[\d+\] are also tune.seeds or the family's seeds"):
            _study({**tune, "tie_seeds": reused})


def test_adding_tie_seeds_runs_only_the_tied_values_on_them_and_selects_again(tmp_path):
    """Planted as in the extend test: tiny LoRA learns in 8 epochs at 3e-2 but not at 3e-3, last-layers at
    neither (a tie at chance). Adding tune.tie_seeds to the finished study makes the tie round list last-layers'
    two values alone; they train on the tie seed, nothing trained before trains again, and the selection, the
    tuning table and the report are made again from the tuning and tie seeds."""
    workdir = tmp_path / "ties"
    path = mini_study(workdir, seeds=[0])
    config = yaml.safe_load(path.read_text())
    config["base"]["train"]["epochs"] = 8
    config["families"]["methods"]["tune"] = {"key": "train.lr", "values": [3.0e-3, 3.0e-2], "seeds": [100]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(workdir, "--cores", "2")
    before = json.loads((workdir / "results/tune/methods/selection.json").read_text())
    assert before["tied"] == {"last_layers": [3.0e-3, 3.0e-2]} and "lora" not in before["tied"]
    trained = {p.name: p.stat().st_mtime_ns for p in (workdir / "results/trained").glob("*.json")}
    config["families"]["methods"]["tune"]["tie_seeds"] = [200]
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(workdir, "--cores", "2")
    tie_round = json.loads((workdir / "results/tune/methods/round0.json").read_text())
    assert tie_round["tied"] == before["tied"]
    on_tie_seed = sorted(p.parent.name for p in (workdir / "results/runs/methods_tune").glob("*/seed200.json"))
    assert on_tie_seed == ["last_layers-lr0.003", "last_layers-lr0.03"]
    now = {p.name: p.stat().st_mtime_ns for p in (workdir / "results/trained").glob("*.json")}
    assert len(now) == len(trained) + 2 and all(now[name] == mtime for name, mtime in trained.items())
    final = json.loads((workdir / "results/tune/methods/selection.json").read_text())
    assert final["tie_seeds"] == [200] and set(final["tie_means"]["last_layers"]) == {"0.003", "0.03"}
    assert final["chosen"]["lora"] == before["chosen"]["lora"] == 3.0e-2
    table = pd.read_parquet(workdir / "results/tables/tuning.parquet").set_index(["setting", "value"])
    assert table["n_runs"].eq(1).all() and table.loc["last_layers", "n_tie_runs"].eq(1).all()
    assert table.loc["lora", "n_tie_runs"].eq(0).all()
    runs = pd.read_parquet(workdir / "results/tables/runs.parquet")
    assert runs.loc[runs["seed"] == 200, "tune_tie_seed"].all() and not runs.loc[runs["seed"] != 200,
                                                                                  "tune_tie_seed"].any()
    report = (workdir / "paper/report.md").read_text()
    assert "plus 2 run(s) of the values tied at the top on 1 tie seed(s) (tune.tie_seeds)" in report
    assert "tied with " in report and "on the tuning seeds" in report
    assert not jobs_run(snakemake(workdir, "--cores", "2", "-n"))


def _near_tie_frames(on_tie_seed: dict[float, float] | None = None, margin: float | None = None):
    """One variant on tuning seed 100: 1e-3 at 75.00 %, 3e-3 one answer of 400 behind (74.75 %), 1e-2 at 50 %;
    ``on_tie_seed``: value -> its score on tie seed 200; ``margin``: the tune_tie_margin label (None: none)."""
    runs, metrics = _tie_seed_frames({})
    scores = {1e-3: 0.75, 3e-3: 0.7475, 1e-2: 0.5}
    metrics.loc[metrics["metric"] == "accuracy", "value"] = metrics.loc[
        metrics["metric"] == "accuracy", "run_id"].map(lambda r: scores[float(r.split("lr")[1].split("/")[0])])
    if on_tie_seed:
        tied_runs, tied_metrics = _tie_seed_frames(on_tie_seed)
        runs = tied_runs
        metrics = pd.concat([metrics, tied_metrics[tied_metrics["seed"] == 200]], ignore_index=True)
    if margin is not None:
        runs = runs.assign(tune_tie_margin=margin)
    return runs, metrics


def test_a_tie_margin_sends_a_near_tie_to_the_tie_seeds_like_an_exact_one():
    """One validation answer apart on one seed is no evidence either way: with tune.tie_margin it is a tie, so
    the tie round lists it, the tie seeds decide it (their means without a margin), and it is no grid edge."""
    tune = {"key": "train.lr", "values": [1e-3, 3e-3, 1e-2], "seeds": [100], "metric": "validation_accuracy"}
    runs, metrics = _near_tie_frames()
    exact = selection(runs, metrics, "m", tune)
    assert exact["chosen"] == {"lora": 1e-3} and exact["tied"] == {} and exact["tie_margin"] == 0.0
    near = selection(runs, metrics, "m", {**tune, "tie_margin": 0.0025})
    assert near["tied"] == {"lora": [1e-3, 3e-3]} and "ties (within 0.0025 of the best)" in near["rule"]
    assert near["chosen"] == {"lora": 1e-3}  # the smaller value: here the best on the tuning seed too
    assert selection(runs, metrics, "m", {**tune, "tie_margin": 0.002})["tied"] == {}  # 0.0025 apart: outside
    # The tie seed decides: 3e-3 scores 80 % there, 1e-3 70 %; over both seeds 77.4 % vs 72.5 %.
    runs, metrics = _near_tie_frames({1e-3: 0.70, 3e-3: 0.80}, margin=0.0025)
    decided = selection(runs, metrics, "m", {**tune, "tie_seeds": [200]})
    assert decided["chosen"] == {"lora": 3e-3}
    assert decided["tie_means"] == {"lora": pytest.approx({"0.001": 0.725, "0.003": 0.77375})}
    # The margin comes from the runs' labels where the tune block does not give it (the workflow's selection).
    assert tie_rules(runs) == ("smaller", 0.0025)
    assert selection(runs, metrics, "m", TIE_TUNE)["chosen"] == {"lora": 3e-3}
    assert tie_rules(runs, {"tie_margin": 0.0}) == ("smaller", 0.0)
    # A grid end ahead of its neighbour by no more than the margin is a flat end, not an edge.
    scores = pd.DataFrame({"setting": "lora", "value": [1e-3, 3e-3], "mean": [0.7475, 0.75]})
    assert chosen_edges(scores, {"lora": 3e-3}) == {"lora": "high"}
    assert chosen_edges(scores, {"lora": 3e-3}, 0.0025) == {"lora": ""}


def test_the_table_and_the_report_name_the_tie_margin():
    runs, metrics = _near_tie_frames({1e-3: 0.70, 3e-3: 0.80}, margin=0.0025)
    table = tuning_table(runs, metrics)
    assert table.set_index("value")["tied"].to_dict() == {1e-3: True, 3e-3: True, 1e-2: False}
    assert (table["tie_margin"] == 0.0025).all() and table.loc[table["chosen"], "value"].tolist() == [3e-3]
    section = tune_section("m_tune", {"tuning": table, "runs": runs})
    assert section["within"] == " (within 0.25 points of the best)"
    assert {r["value"]: r["chosen"] for r in section["rows"]}["0.003"].startswith(
        "**chosen** (tied (within the tie margin, 0.25 points) with 0.001 on the tuning seeds; decided by 1 tie "
        "seed(s)")
    # An exact tie is called one, margin or not.
    runs, metrics = _tie_seed_frames({1e-3: 0.70, 3e-3: 0.80})
    exact = tune_section("m_tune", {"tuning": tuning_table(runs.assign(tune_tie_margin=0.0025), metrics), "runs": runs})
    assert {r["value"]: r["chosen"] for r in exact["rows"]}["0.003"].startswith("**chosen** (tied with 0.001 on the")
    runs, metrics = _near_tie_frames({1e-3: 0.70, 3e-3: 0.80}, margin=0.0025)
    # Without the label (a study without tie_margin, or records made before it): exact ties only.
    plain = tuning_table(runs.drop(columns="tune_tie_margin"), metrics)
    assert not plain["tied"].any() and (plain["tie_margin"] == 0.0).all()
    assert tune_section("m_tune", {"tuning": plain, "runs": runs})["within"] == ""


def test_tie_margin_is_a_label_of_the_tuning_runs_never_part_of_what_they_train():
    tune = {"key": "train.lr", "values": [1.0e-3, 1.0e-2], "seeds": [100]}
    plain, near = _study(tune), _study({**tune, "tie_margin": 0.0025})
    assert near.labels("methods_tune", "lora-lr0.001", 100)["tune_tie_margin"] == 0.0025
    assert "tune_tie_margin" not in plain.labels("methods_tune", "lora-lr0.001", 100)  # old records keep labels
    assert set(near.trained_configs()) == set(plain.trained_configs())
    for bad in (-0.01, 2):
        with pytest.raises(ConfigError, match="tie_margin"):
            _study({**tune, "tie_margin": bad})


def test_a_changed_tie_round_is_read_fresh_in_the_same_invocation(tmp_path):
    """Rounds and the selection are chained checkpoints. When an existing tie round is made again with other
    contents (here: tie_margin widened, so LoRA's values tie too), Snakemake 9 took the old file as current for
    the selection after it (snakemake/snakemake#3862): the selection ran before the round, without the new
    tie-seed runs, the family trained at its choice, and a second invocation selected again and left the
    family's runs to a third. Each round and the selection are inputs of what reads them, so one invocation
    ends with everything made from the new round, and nothing left to do."""
    workdir = tmp_path / "chain"
    path = mini_study(workdir, seeds=[0])
    config = yaml.safe_load(path.read_text())
    config["base"]["train"]["epochs"] = 8
    config["families"]["methods"]["tune"] = {"key": "train.lr", "values": [3.0e-3, 3.0e-2], "seeds": [100],
                                             "extend": 1, "tie_seeds": [200]}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(workdir, "--cores", "2")
    before = json.loads((workdir / "results/tune/methods/round1.json").read_text())
    assert set(before["tied"]) == {"last_layers"}
    config["families"]["methods"]["tune"]["tie_margin"] = 1.0
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(workdir, "--cores", "2")
    tie_round = json.loads((workdir / "results/tune/methods/round1.json").read_text())
    final = json.loads((workdir / "results/tune/methods/selection.json").read_text())
    assert set(tie_round["tied"]) == {"lora", "last_layers"}
    assert {"0.003", "0.03"} <= set(final["tie_means"]["lora"]) and None not in final["tie_means"]["lora"].values()
    runs = pd.read_parquet(workdir / "results/tables/runs.parquet")
    for variant, lr in runs.query("family == 'methods'")[["variant", "cfg.train.lr"]].itertuples(index=False):
        assert lr == final["chosen"][variant], variant
    assert not jobs_run(snakemake(workdir, "--cores", "2", "-n"))


def test_relabelling_every_run_of_a_finished_tuned_study_takes_one_invocation(tmp_path):
    """Relabelling every run (here `--forcerun label_run`; a change of the label command does the same) makes the
    tune round again from byte-identical records. Snakemake 9 then judged the selection after it up to date and
    never revisited the runs waiting on it: they were dropped for that invocation, or, forced, ran with their
    inputs unresolved and failed. A round written again is a new file (its `made_at`), so the selection runs
    again and the runs after it are worked out."""
    workdir = tmp_path / "relabel"
    path = mini_study(workdir, seeds=[0])
    config = yaml.safe_load(path.read_text())
    config["base"]["train"]["epochs"] = 8
    # A grid whose choices sit inside it (LoRA learns at 3e-2, last layers nowhere): the round asks for nothing.
    config["families"]["methods"]["tune"] = {"key": "train.lr", "values": [3.0e-3, 3.0e-2, 0.3], "seeds": [100],
                                             "extend": 1}
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    snakemake(workdir, "--cores", "2")
    before = json.loads((workdir / "results/tune/methods/selection.json").read_text())
    assert not any(before["chosen_edge"].values())
    records = sorted(str(p.relative_to(workdir)) for p in (workdir / "results/runs").rglob("*.json"))
    forced = snakemake(workdir, "--cores", "2", "--forcerun", "label_run")  # fails if a job fails
    log = forced.stdout + forced.stderr
    # What ran (the 'Job stats' table is the plan made before the round ran again).
    assert sorted(re.findall(r"output: (results/runs/\S+\.json)", log)) == records
    assert "select_tune:" in log and "rule train:" not in log
    after = json.loads((workdir / "results/tune/methods/selection.json").read_text())
    assert after["chosen"] == before["chosen"]
    assert not jobs_run(snakemake(workdir, "--cores", "2", "-n"))

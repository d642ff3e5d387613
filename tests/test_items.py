"""Per-example predictions and the item-level statistics (lora_bench.run.predictions, lora_bench.analysis.items).

Planted effects: simulated predictions with a known difference (and none) must be found (and not), the
false-positive rate of the crossed test must stay within [0.03, 0.07], McNemar must match a hand count,
rank probabilities must sum to one. Two tiny training runs check ids and the record-to-table path.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest

from lora_bench.analysis import items
from lora_bench.analysis.tables import PREDICTION_COLUMNS, collect_all, write_tables
from lora_bench.cli import main
from lora_bench.config import RunConfig
from lora_bench.report.render import build_report
from lora_bench.run.predictions import decode_block, item_block, predictions_section, take_items
from lora_bench.run.train import run_training


def test_item_block_round_trip_sorted_by_id_and_compact():
    block = item_block([7, 2, 5], [1, 0, 1], [1, 1, 1], [-0.1, -2.0, -0.3])
    columns = decode_block(block)
    assert columns["example_id"].tolist() == [2, 5, 7]
    assert columns["gold"].tolist() == [0, 1, 1] and columns["correct"].tolist() == [False, True, True]
    assert columns["gold_logp"] == pytest.approx([-2.0, -0.3, -0.1])
    big = item_block(np.arange(1000), np.zeros(1000), np.zeros(1000), np.zeros(1000))
    assert len(json.dumps(big, indent=2)) < 17 * 1000  # 12 bytes per example, base64
    with pytest.raises(ValueError, match="unique"):
        item_block([1, 1], [0, 0], [0, 0], [0, 0])


def test_take_items_keeps_only_validation_and_test():
    record = {"epoch": 1, "train_items": {"n": 0}, "validation_items": {"n": 1}, "test_items": {"n": 2},
              "test_accuracy": 0.5}
    taken = take_items(record)
    assert record == {"epoch": 1, "test_accuracy": 0.5}
    assert set(predictions_section(1, taken)["splits"]) == {"validation", "test"}
    assert predictions_section(1, {}) == {}


def _record(run: dict, result) -> dict:
    return {"schema_version": 1, "status": "ok", "run": run, "config": result_config(run),
            "metrics": result.metrics, "params": result.params, "predictions": result.predictions}


def result_config(run: dict) -> dict:
    return {"data": {"source": "local", "name": "sentiment.csv", "split_seed": 0}, "method": {"name": "lora"},
            "seed": run["seed"]}


def test_runs_keep_predictions_with_stable_ids_and_collect_them(tiny_run, tmp_path):
    tiny_run = {**tiny_run, "train": {**tiny_run["train"], "epochs": 1}}
    classification = run_training(RunConfig.from_dict(tiny_run))
    other_seed = run_training(RunConfig.from_dict({**tiny_run, "seed": 1}))
    instruct = run_training(RunConfig.from_dict({
        **tiny_run, "task": "instruct", "model": {"source": "random", "name": "tiny-llama"},
        "data": {**tiny_run["data"], "max_length": 128}}))
    ids = {}
    for name, result in (("cls", classification), ("seed1", other_seed), ("instruct", instruct)):
        section = result.predictions
        assert section["epoch"] == result.metrics["selected_epoch"]
        assert set(section["splits"]) == {"validation", "test"}
        test = decode_block(section["splits"]["test"])
        # The per-example outcomes are the run's accuracy.
        assert test["correct"].mean() == pytest.approx(result.metrics["final"]["test_accuracy"])
        assert np.all(test["gold_logp"] <= 0)
        ids[name] = test["example_id"]
        assert not any(key.endswith("_items") for epoch in result.metrics["epochs"] for key in epoch)
    # The same source rows across seeds, families and tasks (classification vs closed-answer instruct).
    assert np.array_equal(ids["cls"], ids["seed1"]) and np.array_equal(ids["cls"], ids["instruct"])
    assert "gold_loglik" in instruct.predictions["splits"]["test"]

    paths = []
    for seed, result in ((0, classification), (1, other_seed)):
        for variant, is_baseline in (("a", True), ("b", False)):
            run = {"family": "fam", "family_kind": "methods", "variant": variant, "seed": seed,
                   "is_baseline": is_baseline, "data_seed": 0, "train_seed": seed}
            path = tmp_path / f"{variant}{seed}.json"
            path.write_text(json.dumps(_record(run, result)))
            paths.append(path)
    runs, metrics, predictions = collect_all(paths)
    assert list(predictions.columns) == PREDICTION_COLUMNS
    assert len(predictions) == 4 * (len(ids["cls"]) + len(decode_block(
        classification.predictions["splits"]["validation"])["example_id"]))
    written = write_tables(runs, metrics, tmp_path / "tables", predictions)
    assert tmp_path / "tables" / "predictions.parquet" in written
    tests = items.item_tests(pd.read_parquet(tmp_path / "tables" / "predictions.parquet"), runs)
    # Identical runs on both sides: no difference, and nothing to test.
    assert tests.loc[0, "diff"] == 0 and tests.loc[0, "n_seeds"] == 2 and tests.loc[0, "n_items"] == len(ids["cls"])

    # The CLI path of the workflow: stats (with the item tables), the rank figure, the report.
    tables = tmp_path / "tables"
    assert main(["stats", "--tables", str(tables)]) == 0
    for name in ("item_tests", "item_pairs", "item_ranks", "item_summary"):
        assert (tables / f"{name}.parquet").exists(), name
    assert "seeds_for_1pt_items" in pd.read_parquet(tables / "seed_consistency.parquet").columns
    assert main(["figures", "--item-ranks", "--tables", str(tables), "--out-dir", str(tmp_path / "figures")]) == 0
    assert (tmp_path / "figures" / "item_ranks.png").exists()
    build_report(tables, tmp_path / "figures", tmp_path / "paper")
    text = (tmp_path / "paper" / "report.md").read_text(encoding="utf-8")
    assert "2 seeds x" in text and "## Rank uncertainty (item level)" in text


def test_runs_that_test_every_epoch_keep_each_epochs_test_predictions(tiny_run, tmp_path):
    """A run tested after every epoch keeps each epoch's test outcomes (so epochs of one run compare question by
    question); the predictions table holds them as stage ``epoch``, and the item tables read only stage ``final``."""
    every = run_training(RunConfig.from_dict({**tiny_run, "train": {**tiny_run["train"], "test_every_epoch": True}}))
    section, by_epoch = every.predictions, {e["epoch"]: e for e in every.metrics["epochs"]}
    assert sorted(section["epochs"]) == ["1", "2"]
    for epoch, splits in section["epochs"].items():
        assert list(splits) == ["test"]
        assert decode_block(splits["test"])["correct"].mean() == pytest.approx(by_epoch[int(epoch)]["test_accuracy"])
    assert section["epochs"][str(section["epoch"])]["test"] == section["splits"]["test"]
    once = run_training(RunConfig.from_dict({**tiny_run, "train": {**tiny_run["train"], "test_every_epoch": False}}))
    assert "epochs" not in once.predictions and set(once.predictions["splits"]) == {"validation", "test"}

    run = {"family": "fam", "family_kind": "instruct", "variant": "a", "seed": 0, "is_baseline": True,
           "data_seed": 0, "train_seed": 0}
    path = tmp_path / "a0.json"
    path.write_text(json.dumps(_record(run, every)))
    runs, metrics, predictions = collect_all([path])
    write_tables(runs, metrics, tmp_path / "tables", predictions)
    n_test = len(decode_block(section["splits"]["test"])["example_id"])
    n_validation = len(decode_block(section["splits"]["validation"])["example_id"])
    epoch_rows = items.read_predictions(tmp_path / "tables", "epoch")
    assert epoch_rows.groupby("epoch")["split"].agg(lambda s: (len(s), set(s))).to_dict() == {
        1: (n_test, {"test"}), 2: (n_test, {"test"})}
    final = items.read_predictions(tmp_path / "tables")
    assert len(final) == n_test + n_validation and set(final["epoch"]) == {section["epoch"]}
    assert len(items.read_predictions(tmp_path / "tables", None)) == len(final) + 2 * n_test
    # A table from before the stage column: every row is the selected epoch's.
    legacy = tmp_path / "legacy"
    legacy.mkdir()
    final.drop(columns="stage").to_parquet(legacy / "predictions.parquet")
    assert len(items.read_predictions(legacy)) == len(final) and items.read_predictions(legacy, "epoch").empty


def _planted_predictions(effect: float, seeds: int = 3, items_n: int = 400, variants=("base", "v"),
                         data_seeds=(0,), seed: int = 0) -> tuple[pd.DataFrame, pd.DataFrame]:
    rng = np.random.default_rng(seed)
    rows, runs = [], []
    for data_seed in data_seeds:
        difficulty = rng.normal(1.5, 1.5, items_n)
        for j, variant in enumerate(variants):
            for train_seed in range(seeds):
                logit = difficulty + effect * j + rng.normal(0, 1.0, items_n)
                correct = rng.random(items_n) < 1 / (1 + np.exp(-logit))
                run_id = f"fam/{variant}/d{data_seed}s{train_seed}"
                rows.append(pd.DataFrame({
                    "run_id": run_id, "family": "fam", "family_kind": "methods", "variant": variant,
                    "setting": variant, "seed": train_seed, "data_seed": data_seed, "train_seed": train_seed,
                    "is_baseline": j == 0, "data_key": "local:x", "split": "test", "epoch": 1,
                    "example_id": np.arange(items_n) + 1000 * data_seed, "gold": 1,
                    "predicted": correct.astype(int), "correct": correct, "gold_logp": 0.0, "gold_loglik": np.nan,
                    "schema_version": 1}))
                runs.append({"run_id": run_id, "family": "fam", "family_kind": "methods", "variant": variant,
                             "setting": variant, "is_baseline": j == 0, "status": "ok", "seed": train_seed})
    return pd.concat(rows, ignore_index=True), pd.DataFrame(runs)


def _planted_epochs(effect: float) -> tuple[pd.DataFrame, pd.DataFrame]:
    """An epochs family (one variant, 3 seeds) whose test answers after epochs 1, 2, 3 improve by ``effect`` (logit)
    per epoch: the per-epoch rows (stage ``epoch``) and the selected epoch's (stage ``final``, epoch 3)."""
    planted, _ = _planted_predictions(effect, variants=("1", "2", "3"))
    epochs = planted.assign(family_kind="epochs", epoch=planted["variant"].astype(int), variant="lora",
                            setting="lora", is_baseline=True, stage="epoch",
                            run_id=planted["run_id"].str.replace(r"^fam/\d/", "fam/lora/", regex=True))
    predictions = pd.concat([epochs, epochs[epochs["epoch"] == 3].assign(stage="final")], ignore_index=True)
    runs = pd.DataFrame([{"run_id": f"fam/lora/d0s{seed}", "family": "fam", "family_kind": "epochs",
                          "variant": "lora", "setting": "lora", "is_baseline": True, "status": "ok", "seed": seed}
                         for seed in range(3)])
    return predictions, runs


def test_epochs_families_compare_each_epoch_with_the_first_question_by_question():
    """With the answers kept after every epoch, an epochs family's tests (epoch k vs epoch 1 of the same runs, as
    in the seed-level tests table) are item-level too; without them there is no item-level test to claim."""
    predictions, runs = _planted_epochs(1.0)
    tests = items.item_tests(predictions, runs).set_index("variant")
    assert list(tests.index) == ["lora@epoch2", "lora@epoch3"] and (tests["baseline"] == "lora@epoch1").all()
    assert (tests["design"] == "3 seeds x 400 items").all() and (tests["verdict"] == "better").all()
    assert tests.loc["lora@epoch3", "diff"] > tests.loc["lora@epoch2", "diff"] > 0
    pairs = items.item_pairs(predictions, runs)
    assert set(pairs["variant"]) == {"lora@epoch2", "lora@epoch3"} and len(pairs) == 6
    assert items.item_tests(predictions[predictions["stage"] == "final"], runs).empty
    flat, runs = _planted_epochs(0.0)
    assert (items.item_tests(flat, runs)["verdict"] == "n.s.").all()


def test_epochs_table_shows_the_question_level_test_beside_the_seed_level_one():
    from types import SimpleNamespace

    from lora_bench.report.render import _environment
    from lora_bench.report.sections.epochs import epoch_rows

    predictions, runs = _planted_epochs(1.0)
    item = items.item_tests(predictions, runs)
    summary = pd.DataFrame([{"family": "fam", "stage": "epoch", "metric": "accuracy", "variant": "lora",
                             "split": split, "epoch": epoch, "n": 3, "mean": 0.7, "ci_low": 0.6, "ci_high": 0.8}
                            for epoch in (1, 2, 3) for split in ("validation", "test")])
    tests = pd.DataFrame(columns=["family", "metric", "split", "variant"])
    assert [row["by_questions"] for row in epoch_rows("fam", runs, summary, tests)] == ["", "–", "–"]
    rows = epoch_rows("fam", runs, summary, tests, item)
    cells = [row["by_questions"] for row in rows]
    epoch3 = item.set_index("variant").loc["lora@epoch3"]
    assert cells[0] == "" and cells[2].startswith(f"+{100 * epoch3['diff']:.2f} [") and cells[2].endswith("(better)")
    # The rendered table carries the cells (one column more than without them), not a template artefact.
    part = SimpleNamespace(data={"final_rows": [], "epoch_rows": rows, "by_items": True})
    text = _environment().get_template("epochs.md.j2").render(part=part, confidence=95)
    table = [line for line in text.splitlines() if line.startswith("| lora |")]
    assert len(table) == 3 and table[2].endswith(f"| {cells[2]} |") and "built-in" not in text
    assert all(line.count("|") == 10 for line in text.splitlines() if line.startswith("| Variant | Epoch"))


def test_planted_effect_is_found_and_none_is_not():
    predictions, runs = _planted_predictions(1.0)
    found = items.item_tests(predictions, runs)
    assert found.loc[0, "verdict"] == "better" and found.loc[0, "p_value"] < 0.05
    assert found.loc[0, "diff_ci_low"] < found.loc[0, "diff"] < found.loc[0, "diff_ci_high"]
    assert found.loc[0, "design"] == "3 seeds x 400 items"
    predictions, runs = _planted_predictions(0.0, seed=3)
    assert items.item_tests(predictions, runs).loc[0, "verdict"] == "n.s."


def test_data_splits_are_strata_paired_only_within_themselves():
    predictions, runs = _planted_predictions(0.6, seeds=2, data_seeds=(0, 1))
    test = items.item_tests(predictions, runs).iloc[0]
    assert test["n_strata"] == 2 and test["n_seeds"] == 4 and test["n_items"] == 800
    pairs = items.item_pairs(predictions, runs)
    assert sorted(zip(pairs["data_seed"], pairs["train_seed"])) == [(0, 0), (0, 1), (1, 0), (1, 1)]
    # One train seed per data seed: no stratum can estimate the seed variance, so no crossed test.
    one = predictions[predictions["train_seed"] == 0]
    assert items.item_tests(one, runs).loc[0, "p_value"] != items.item_tests(one, runs).loc[0, "p_value"]


def test_mcnemar_on_a_constructed_table():
    # 10 discordant: 8 variant-only, 2 baseline-only; exact two-sided binomial p = 2 * P(X <= 2 | 10, 1/2).
    assert items.mcnemar_exact(8, 2) == pytest.approx(2 * (1 + 10 + 45) / 1024)
    assert items.mcnemar_exact(0, 0) == 1.0
    predictions, runs = _planted_predictions(0.6, seeds=1)
    pair = items.item_pairs(predictions, runs).iloc[0]
    assert pair["both_correct"] + pair["variant_only"] + pair["baseline_only"] + pair["both_wrong"] == 400
    assert pair["p_mcnemar"] == pytest.approx(items.mcnemar_exact(pair["variant_only"], pair["baseline_only"]))


def test_rank_probabilities_sum_to_one_and_ties_group():
    predictions, runs = _planted_predictions(0.5, variants=("base", "same", "better"), seeds=3)
    # "same" gets the baseline's effect: copy the baseline's outcomes with fresh noise by relabelling effect 0.
    ranks = items.item_ranks(predictions, runs, resamples=400)
    per_family_rank = ranks.groupby(["family", "rank"])["probability"].sum()
    assert per_family_rank.to_numpy() == pytest.approx(1.0)
    per_variant = ranks.groupby("variant")["probability"].sum()
    assert per_variant.to_numpy() == pytest.approx(1.0)
    first = ranks.drop_duplicates("variant").set_index("variant")
    assert first["p_rank1"].sum() == pytest.approx(1.0)
    assert first.loc["better", "p_rank1"] > 0.9 and "a" in first.loc["better", "tie_group"]
    assert "a" not in first.loc["base", "tie_group"]


def test_tie_groups_are_maximal_runs_of_pairwise_ties():
    significant = {frozenset(("a", "c")): True}
    groups = items.tie_groups(["a", "b", "c"], np.array([3.0, 2.0, 1.0]), significant)
    assert groups == {"a": "a", "b": "ab", "c": "b"}


def test_accuracy_interval_stays_inside_zero_one():
    predictions, runs = _planted_predictions(2.0, seeds=2, items_n=50)
    summary = items.item_summary(predictions, runs)
    assert (summary["ci_low"] >= 0).all() and (summary["ci_high"] <= 1).all()
    assert (summary["ci_low"] < summary["mean"]).all() and (summary["mean"] < summary["ci_high"]).all()
    perfect = predictions.assign(correct=True)
    row = items.item_summary(perfect, runs).iloc[0]
    assert row["mean"] == 1.0 and row["ci_high"] == 1.0 and 0.9 < row["ci_low"] < 1.0


def test_seeds_needed_falls_with_noise_and_is_infinite_below_the_item_floor():
    assert items.seeds_needed(0.0, 0.0, 0.2, 400) > items.seeds_needed(0.0, 0.0, 0.1, 400)
    assert items.seeds_needed(0.0, 0.1, 0.1, 400) == float("inf")  # sd 0.32 per item: 1 point needs > 400 items


def test_calibration_false_positive_rate_and_power():
    table = items.calibrate(replicates=1500, seeds=(3,), effects=(0.0, 0.8))
    null = table[table["effect_logit"] == 0]
    assert ((null["reject_items"] >= 0.03) & (null["reject_items"] <= 0.07)).all(), null
    planted = table[table["effect_logit"] > 0]
    # About 8 points on 400 items with 3 seeds; seeds that shift a method by ~3 points as a whole cost power.
    usual = planted["sd_method_seed"] <= 0.1
    assert (planted.loc[usual, "reject_items"] > 0.7).all(), planted
    assert (planted.loc[~usual, "reject_items"] > 0.45).all(), planted
    # Keeping the seed mean square costs the item-level test no power against the seed-level one.
    assert (planted["reject_items"] > planted["reject_seeds"] - 0.05).all(), planted


@pytest.mark.slow
def test_calibration_at_two_and_five_seeds():
    table = items.calibrate(replicates=4000, seeds=(2, 5), effects=(0.0,))
    assert ((table["reject_items"] >= 0.03) & (table["reject_items"] <= 0.07)).all(), table

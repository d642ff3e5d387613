"""benchmarks/tuning_subset.py: a tuning run on a larger validation set, scored on the smaller set it holds."""

from __future__ import annotations

import json

import numpy as np
import pandas as pd
import pytest
from benchmark_helpers import load_benchmark

from lora_bench import SCHEMA_VERSION
from lora_bench.run.predictions import item_block, predictions_section

subset = load_benchmark("tuning_subset")

# Eight validation questions (source rows 10..17); the run answers rows 10, 11, 12, 14, 16 correctly.
IDS = np.arange(10, 18)
CORRECT = np.isin(IDS, [10, 11, 12, 14, 16])
LOSSES = {1: 0.5, 2: 0.25, 3: 0.125}  # training loss after each epoch


def _record(value: float, epoch: int = 3) -> dict:
    gold = np.ones(len(IDS), dtype=int)
    predicted = np.where(CORRECT, 1, 0)
    block = item_block(IDS[::-1], gold[::-1], predicted[::-1], np.zeros(len(IDS)))  # any order in, sorted out
    return {"schema_version": SCHEMA_VERSION, "status": "ok",
            "run": {"family": "f_tune", "variant": f"lora-lr{value}", "seed": 100, "setting": "lora",
                    "tune_value": value},
            "metrics": {"selected_epoch": epoch, "final": {"validation_accuracy": float(CORRECT.mean())},
                        "epochs": [{"epoch": e, "train_loss": LOSSES[e], "validation_accuracy": 0.5 + e / 10}
                                   for e in LOSSES]},
            "diagnostics": {"learned": True, "collapsed": False, "diverged": False, "plateaued": True},
            "predictions": predictions_section(epoch, {"validation": block})}


def test_subset_score_counts_only_the_requested_examples():
    score = subset.subset_score(_record(1e-3), [17, 10, 12, 13])  # correct: 10, 12; wrong: 13, 17
    assert score["n"] == 4 and score["accuracy"] == 0.5 and score["epoch"] == 3
    assert score["outcomes"] == {10: True, 12: True, 13: False, 17: False}


def test_a_subset_outside_the_run_is_named_not_scored_on_the_overlap():
    with pytest.raises(ValueError, match="2 of the 3 requested validation examples are not in the run"):
        subset.subset_score(_record(1e-3), [10, 99, 98])


def test_compare_reproduces_a_matching_reference_and_flags_a_different_one(tmp_path):
    runs = tmp_path / "runs"
    for value in (1e-3, 3e-3):
        (runs / f"lora-lr{value}").mkdir(parents=True)
        (runs / f"lora-lr{value}" / "seed100.json").write_text(json.dumps(_record(value)))
    reference = tmp_path / "tables"
    reference.mkdir()
    held = [10, 11, 13, 15]  # the smaller set: the run gets 10 and 11 right
    rows = []
    for value, correct in ((1e-3, [True, True, False, False]),   # what the run gives: reproduced
                           (3e-3, [True, True, True, False])):   # one answer differs: not reproduced
        rows += [{"run_id": f"f_tune/lora-lr{value}/seed100", "family_kind": "tune", "split": "validation",
                  "epoch": 3, "example_id": i, "correct": c} for i, c in zip(held, correct)]
    pd.DataFrame(rows).to_parquet(reference / "predictions.parquet")
    pd.DataFrame([{"run_id": f"f_tune/lora-lr{value}/seed100", "metric": "loss", "split": "train", "stage": "epoch",
                   "epoch": e, "value": loss * (1 if value == 1e-3 else 1 + 1e-5)}  # the second: other rounding
                  for value in (1e-3, 3e-3) for e, loss in LOSSES.items()]).to_parquet(reference / "metrics.parquet")
    pd.DataFrame([{"family": "f", "setting": "lora", "value": 3e-3, "chosen": True},
                  {"family": "f", "setting": "lora", "value": 1e-3, "chosen": False}]
                 ).to_csv(reference / "tuning.csv", index=False)
    selection = {"family": "f", "chosen": {"lora": 1e-3}, "chosen_edge": {"lora": "low"},
                 "scores": {"lora": {"0.001": 0.625, "0.003": 0.625}}}
    result = subset.compare(runs, reference, selection)
    by_value = {run["value"]: run for run in result["runs"]}
    assert by_value[1e-3]["subset_accuracy"] == by_value[1e-3]["reference_accuracy"] == 0.5
    assert by_value[1e-3]["same_outcomes"] == 4 and by_value[3e-3]["same_outcomes"] == 3
    assert by_value[3e-3]["reference_accuracy"] == 0.75 and by_value[3e-3]["n_validation"] == len(IDS)
    assert by_value[1e-3]["train_loss_max_rel_diff"] == 0
    assert by_value[3e-3]["train_loss_max_rel_diff"] == pytest.approx(1e-5, rel=1e-3)
    assert by_value[3e-3]["validation_by_epoch"] == {1: 0.6, 2: 0.7, 3: 0.8}
    assert result["identical_training"] == 1 and result["train_loss_max_rel_diff"] == pytest.approx(1e-5, rel=1e-3)
    assert result["same_epoch"] == 2 and result["same_answers"] == 1 and all(run["trained"] for run in result["runs"])
    assert result["variants"]["lora"] == {"reference_choice": 3e-3, "choice": 1e-3, "edge": "low",
                                          "scores": {"0.001": 0.625, "0.003": 0.625}}

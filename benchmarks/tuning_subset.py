"""Tuning runs on a larger validation set, scored again on the smaller set they contain.

Why: ``config/instruct.yaml`` chose each variant's learning rate on one seed and 48 validation questions;
``config/instruct_tune192.yaml`` re-runs the same tuning runs (same grids, seed and budget) on 192 questions
that hold those 48. Evaluation does not touch training, so each re-run must train exactly as the committed run
did: the same training loss after every epoch (the reference's ``metrics`` table; equal up to rounding where the
two ran on other CPUs or commits) and, where validation selects the same epoch, nearly the same answer to each
of the 48 questions. Then a changed pick is due to the 144 added
questions, not to a different run. This script does that check and sets both selections side by side:

    python benchmarks/tuning_subset.py --runs results/tune192/instruct/runs/instruct_tune \\
        --reference results/instruct/tables --selection results/tune192/instruct/tune/instruct/selection.json \\
        --out results/tune192/instruct/tune/instruct/subset48.json

The 48 questions are the example ids of the reference study's own validation predictions for the same run
(``predictions.parquet``), so nothing about the split is recomputed here.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np
import pandas as pd

from lora_bench.analysis.items import read_predictions
from lora_bench.run.diagnostics import trained
from lora_bench.run.predictions import decode_block
from lora_bench.run.record import read_record, write_json_atomic


def subset_score(record: dict, example_ids, split: str = "validation") -> dict:
    """A run's accuracy at its selected epoch on the given examples of ``split``, its per-example outcomes, and
    how many examples of ``split`` the run answered (``n_split``).

    Every requested id must be among the run's own predictions: a subset that is not contained in the larger
    set is a different question, named rather than scored on what overlaps."""
    block = decode_block(record["predictions"]["splits"][split])
    wanted = np.asarray(sorted(int(i) for i in example_ids), dtype=np.int64)
    position = {int(i): k for k, i in enumerate(block["example_id"])}
    missing = [int(i) for i in wanted if int(i) not in position]
    if missing:
        raise ValueError(f"{len(missing)} of the {len(wanted)} requested {split} examples are not in the run's "
                         f"predictions (first: {missing[:5]})")
    rows = np.array([position[int(i)] for i in wanted], dtype=np.int64)
    correct = block["correct"][rows]
    return {"n": len(wanted), "n_split": int(block["example_id"].size),
            "accuracy": float(correct.mean()) if len(wanted) else float("nan"),
            "epoch": record["predictions"]["epoch"],
            "outcomes": dict(zip((int(i) for i in wanted), (bool(c) for c in correct)))}


def compare(runs_dir: Path, reference_dir: Path, selection: dict) -> dict:
    """Per tuning run: the new score (all validation questions), the score on the reference's questions, and
    the reference's own score and epoch; per variant: the value each selection chose."""
    metrics = pd.read_parquet(reference_dir / "metrics.parquet")
    train_loss = metrics[(metrics.metric == "loss") & (metrics.split == "train") & (metrics.stage == "epoch")]
    predictions = read_predictions(reference_dir)  # the selected epoch's rows, which the tuning compares
    predictions = predictions[(predictions.family_kind == "tune") & (predictions.split == "validation")]
    tuning = pd.read_csv(reference_dir / "tuning.csv")
    tuning = tuning[tuning.family == selection["family"]]
    runs = []
    for path in sorted(runs_dir.glob("*/seed*.json")):
        record = read_record(path)
        labels = record["run"]
        run_id = f"{labels['family']}/{labels['variant']}/seed{labels['seed']}"
        reference = predictions[predictions.run_id == run_id]
        if reference.empty:
            continue  # a value the reference never ran (a different extension round)
        sub = subset_score(record, reference.example_id)
        reference_outcomes = dict(zip(reference.example_id.astype(int), reference.correct.astype(bool)))
        final = record["metrics"]["final"]
        reference_loss = train_loss[train_loss.run_id == run_id].set_index("epoch")["value"]
        new_loss = {e["epoch"]: e["train_loss"] for e in record["metrics"]["epochs"] if "train_loss" in e}
        if set(reference_loss.index) != set(new_loss):
            raise ValueError(f"{run_id}: training losses for epochs {sorted(new_loss)}, the reference's for "
                             f"{sorted(reference_loss.index)}")
        runs.append({
            "run_id": run_id, "setting": labels.get("setting"), "value": labels.get("tune_value"),
            "selected_epoch": record["metrics"]["selected_epoch"],
            "validation_accuracy": final["validation_accuracy"],
            "validation_by_epoch": {e["epoch"]: e["validation_accuracy"] for e in record["metrics"]["epochs"]
                                    if "validation_accuracy" in e},
            "train_loss_max_rel_diff": max(abs(new_loss[e] - v) / abs(v) for e, v in reference_loss.items()),
            "n_validation": sub["n_split"],
            "subset_accuracy": sub["accuracy"], "subset_n": sub["n"],
            "reference_epoch": int(reference.epoch.iloc[0]),
            "reference_accuracy": float(reference.correct.mean()),
            "same_outcomes": sum(reference_outcomes[i] == c for i, c in sub["outcomes"].items()),
            "trained": trained(record.get("diagnostics") or {}),
        })
    chosen_reference = {row.setting: float(row.value) for row in tuning[tuning.chosen].itertuples()}
    variants = {setting: {"reference_choice": chosen_reference.get(setting), "choice": value,
                          "edge": selection.get("chosen_edge", {}).get(setting, ""),
                          "scores": selection["scores"][setting]}
                for setting, value in selection["chosen"].items()}
    same_epoch = [r for r in runs if r["selected_epoch"] == r["reference_epoch"]]
    return {"runs": runs, "variants": variants,
            # JSON and parquet keep float64 exactly: 0 means the same arithmetic, a small value the same training
            # with other rounding (another CPU's kernels, or a change of the code between the two studies).
            "identical_training": sum(r["train_loss_max_rel_diff"] == 0 for r in runs),
            "train_loss_max_rel_diff": max((r["train_loss_max_rel_diff"] for r in runs), default=float("nan")),
            "same_epoch": len(same_epoch),
            "same_answers": sum(r["same_outcomes"] == r["subset_n"] for r in same_epoch)}


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=Path, required=True, help="the larger study's tuning run records")
    parser.add_argument("--reference", type=Path, required=True, help="the smaller study's tables folder")
    parser.add_argument("--selection", type=Path, required=True, help="the larger study's selection.json")
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args(argv)
    result = compare(args.runs, args.reference, json.loads(args.selection.read_text()))
    write_json_atomic(result, args.out)
    for run in result["runs"]:
        print(f"{run['run_id']:45s} epoch {run['selected_epoch']} (ref {run['reference_epoch']}) "
              f"all {run['validation_accuracy']:.3f} of {run['n_validation']}  "
              f"subset {run['subset_accuracy']:.4f} ref {run['reference_accuracy']:.4f}  "
              f"same {run['same_outcomes']}/{run['subset_n']}  loss diff {run['train_loss_max_rel_diff']:.1e}  "
              f"trained {run['trained']}")
    for setting, variant in result["variants"].items():
        print(f"{setting:14s} reference {variant['reference_choice']}  now {variant['choice']} {variant['edge']}")
    print(f"{result['identical_training']} of {len(result['runs'])} runs trained bit for bit as the reference did "
          f"(largest relative difference of an epoch's training loss {result['train_loss_max_rel_diff']:.1e}); "
          f"{result['same_answers']} of the {result['same_epoch']} at the same selected epoch gave the same answers")


if __name__ == "__main__":
    main()

"""Where a run's CPU time goes: set-up and evaluation timed apart from training, throughput without warm-up
steps, length-grouped batches, and a macro-F1 that needs no scikit-learn import."""

from __future__ import annotations

import time

import numpy as np
import pytest
import torch
from sklearn.metrics import f1_score

from lora_bench.config import RunConfig
from lora_bench.run.data import macro_f1
from lora_bench.run.train import WARMUP_STEPS, LengthGroupedBatches, run_training, step_throughput
from lora_bench.warm import PROCESS_STARTED_ENV


@pytest.mark.parametrize("seed", range(6))
def test_macro_f1_equals_scikit_learn(seed):
    rng = np.random.default_rng(seed)
    classes = 2 + seed % 3
    actual = rng.integers(0, classes, 40)
    # Some predictions collapse to one class, some use a class absent from the truth.
    predicted = np.zeros(40, int) if seed == 0 else rng.integers(0, classes + seed % 2, 40)
    assert macro_f1(actual, predicted) == pytest.approx(f1_score(actual, predicted, average="macro",
                                                                 zero_division=0), abs=1e-12)


def test_throughput_leaves_out_the_warm_up_steps():
    # Slow warm-up steps (5 s each) followed by fast ones: throughput is that of the fast steps only.
    seconds = [5.0] * WARMUP_STEPS + [0.5] * 10
    steps = {"seconds": seconds, "examples": [8] * len(seconds), "tokens": [80] * len(seconds),
             "padded": [100] * len(seconds)}
    out = step_throughput(steps)
    assert out["warmup_steps"] == WARMUP_STEPS and out["timed_steps"] == 10
    assert out["examples_per_s"] == pytest.approx(16.0) and out["tokens_per_s"] == pytest.approx(160.0)
    assert out["median_step_s"] == 0.5 and out["p95_step_s"] == pytest.approx(0.5)
    assert out["padding_fraction"] == pytest.approx(0.2)
    # Too few steps to leave any out: all of them count.
    short = step_throughput({k: v[:2] for k, v in steps.items()})
    assert short["warmup_steps"] == 0 and short["examples_per_s"] == pytest.approx(16 / 10)


def _batches(lengths, seed, batch_size=4):
    return list(LengthGroupedBatches(lengths, batch_size, torch.Generator().manual_seed(seed)))


def test_length_grouped_batches_cover_every_example_once_repeat_per_seed_and_pad_less():
    rng = np.random.default_rng(0)
    lengths = rng.integers(5, 60, 1000).tolist()
    batches = _batches(lengths, seed=3)
    assert sorted(i for b in batches for i in b) == list(range(1000))
    assert batches == _batches(lengths, seed=3) and batches != _batches(lengths, seed=4)
    generator = torch.Generator().manual_seed(3)
    shuffled = torch.randperm(1000, generator=generator).tolist()
    random_batches = [shuffled[i : i + 4] for i in range(0, 1000, 4)]

    def padding(groups):
        return 1 - sum(sum(lengths[i] for i in b) for b in groups) / sum(max(lengths[i] for i in b) * len(b)
                                                                           for b in groups)

    assert padding(batches) < padding(random_batches) / 4


def test_a_run_records_setup_and_eval_time_and_padding(tiny_run, monkeypatch):
    tiny_run["train"]["epochs"] = 1
    # Set-up counts from the start of the run's command; in this test process, from now.
    monkeypatch.setenv(PROCESS_STARTED_ENV, repr(time.time()))
    plain = run_training(RunConfig.from_dict(tiny_run))
    timing = plain.timing
    assert 0 < timing["setup_s"] < timing["wall_time_s"]
    assert timing["eval_s"] > 0 and timing["train_time_s"] > 0
    assert timing["wall_time_s"] >= timing["train_time_s"] + timing["eval_s"]
    assert 0 <= timing["padding_fraction"] < 1 and timing["p95_step_s"] >= timing["median_step_s"]
    tiny_run["train"]["length_grouping"] = True
    grouped = run_training(RunConfig.from_dict(tiny_run))
    assert grouped.timing["padding_fraction"] < timing["padding_fraction"]
    assert grouped.timing["optimizer_steps"] == timing["optimizer_steps"]
    # Left out of the resolved config at its default, so runs that existed before the key keep their params.
    assert "length_grouping" not in RunConfig.from_dict({}).to_dict()["train"]


def test_test_split_once_at_the_selected_epoch_gives_the_same_final_numbers(tiny_run):
    tiny_run["train"].update(epochs=3, lr=5.0e-2, eval_train=False)
    every = run_training(RunConfig.from_dict(tiny_run))
    tiny_run["train"]["test_every_epoch"] = False
    once = run_training(RunConfig.from_dict(tiny_run))
    assert once.metrics["final"] == every.metrics["final"]
    assert once.metrics["selected_epoch"] == every.metrics["selected_epoch"]
    tested = [e["epoch"] for e in once.metrics["epochs"] if "test_accuracy" in e]
    assert tested == [once.metrics["selected_epoch"]]
    # Validation is still measured after every epoch: selection does not change.
    assert [e["validation_accuracy"] for e in once.metrics["epochs"]] == [
        e["validation_accuracy"] for e in every.metrics["epochs"]]


def test_best_epoch_weights_are_restored_for_the_one_test_pass():
    from lora_bench.run.train import BestEpoch

    model = torch.nn.Linear(2, 1)
    seen = []

    class Task:
        @staticmethod
        def select(record):
            return record["validation_accuracy"]

        @staticmethod
        def evaluate(model, split):
            seen.append(model.weight.detach().clone())
            return {"accuracy": float(model.weight.sum())}

    class Train:
        eval_train = False

    best = BestEpoch(Task, model, Train)
    with torch.no_grad():
        model.weight.fill_(1.0)
    first = {"epoch": 1, "validation_accuracy": 0.9}
    best.after_epoch(first)
    with torch.no_grad():
        model.weight.fill_(7.0)  # training went on and got worse on validation
    best.after_epoch({"epoch": 2, "validation_accuracy": 0.6})
    best.evaluate_test(last_epoch=2)
    assert torch.equal(seen[0], torch.ones(1, 2)) and first["test_accuracy"] == 2.0

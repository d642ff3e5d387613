"""benchmarks/bench_peer.py (``make bench-peer``): the peer run, the statistics and the JSON it writes.

On a random-weights tiny BERT and the tiny local sentiment file, so no pretrained model or download is
needed; the real MiniLM settings are only checked to match config/cpu_full.yaml.
"""

from __future__ import annotations

import json
import os
import stat
from pathlib import Path

import pytest
from benchmark_helpers import load_benchmark

from lora_bench.config import load_yaml

ROOT = Path(__file__).resolve().parent.parent


bench = load_benchmark("bench_peer")


def _tiny(csv: Path, cache: Path, epochs: int = 1) -> dict:
    """Overrides turning the benchmark's run into a seconds-long one on the tiny random BERT."""
    return {"model": {"source": "random", "name": "tiny-bert"},
            "data": {"source": "local", "name": str(csv), "max_length": 32, "cache_dir": str(cache)},
            "train": {"epochs": epochs, "batch_size": 8}}


def _umask() -> int:
    umask = os.umask(0)
    os.umask(umask)
    return umask


def test_settings_are_the_cpu_full_study_and_the_suites_warmup():
    """The benchmarked run is the CPU peer measurement: config/cpu_full.yaml's base run at the peer's 3 epochs (the
    converged reference trains 5), warm-up as train.py."""
    from lora_bench.run.train import WARMUP_STEPS

    reference_base = load_yaml(ROOT / "config" / "cpu_full.yaml")["base"]
    reference_base["train"]["epochs"] = 3
    assert bench.BASE_RUN == reference_base
    assert bench.WARMUP_STEPS == WARMUP_STEPS
    run = bench.run_config(seed=3, epochs=1, threads=2, max_train_examples=320)
    assert (run["seed"], run["train"]["epochs"], run["train"]["threads"]) == (3, 1, 2)
    assert run["data"]["max_examples"] == {"train": 320}
    assert bench.BASE_RUN["train"]["epochs"] == 3 and "max_examples" not in bench.BASE_RUN["data"]


def test_peer_train_on_a_tiny_model(sentiment_csv, tmp_path):
    run = bench.run_config(seed=0, threads=1, overrides=_tiny(sentiment_csv, tmp_path / "cache", epochs=2))
    record = bench.peer_train(run)
    _, splits, info = bench.prepare_data(run)
    n_train = len(splits["train"])
    timing = record["timing"]
    assert record["data"]["cache"] == info["cache"]  # the tokenized examples lora_bench reads
    assert len(timing["step_times_s"]) == len(timing["step_examples"]) == timing["optimizer_steps"] == 2 * -(
        -n_train // 8)
    assert sum(timing["step_examples"]) == 2 * n_train
    assert all(t > 0 for t in timing["step_times_s"])
    assert [r["epoch"] for r in record["metrics"]["epochs"]] == [1, 2]
    best = record["metrics"]["epochs"][record["metrics"]["selected_epoch"] - 1]
    assert record["metrics"]["final"]["test_accuracy"] == best["test_accuracy"]
    assert best["validation_accuracy"] == max(r["validation_accuracy"] for r in record["metrics"]["epochs"])
    # LoRA r=8 on query and value of both blocks (32 -> 32) plus the 32 -> 2 classifier copy peft trains.
    assert record["params"]["trainable"] == 2 * 2 * (32 * 8 + 8 * 32) + (32 * 2 + 2)


def test_loop_stats_leave_out_the_warmup_steps():
    stats = bench.loop_stats([5.0, 5.0, 5.0, 1.0, 1.0, 2.0], [32, 32, 32, 32, 32, 16])
    assert stats["timed_steps"] == 3 and stats["warmup_steps_excluded"] == 3
    assert stats["train_loop_examples_per_s"] == pytest.approx(80 / 4.0)
    assert stats["median_step_s"] == 1.0
    assert stats["p95_step_s"] == pytest.approx(1.9)
    # A smoke with no more steps than the warm-up times all of them rather than none.
    assert bench.loop_stats([2.0, 2.0], [4, 4])["train_loop_examples_per_s"] == 2.0
    with pytest.raises(ValueError):
        bench.loop_stats([1.0, 1.0], [4])


def _row(seed: int, wall: float, loop: float, accuracy: float) -> dict:
    return {"seed": seed, "wall_time_s": wall, "whole_run_examples_per_s": 100.0 / wall,
            "train_loop_examples_per_s": loop, "median_step_s": 32 / loop, "p95_step_s": 40 / loop,
            "test_accuracy": accuracy, "validation_accuracy": accuracy, "train_time_s": wall / 2,
            "data_cache": "c", "data_sizes": {"train": 100}}


def test_summarize_ratios_means_and_accuracy_equality():
    results = {"lora_bench": [_row(0, 10.0, 50.0, 0.80), _row(1, 12.0, 40.0, 0.82), _row(2, 11.0, 45.0, 0.78)],
               "peft": [_row(0, 8.0, 100.0, 0.81), _row(1, 9.0, 80.0, 0.80), _row(2, 10.0, 90.0, 0.79)]}
    out = bench.summarize(results)
    for field in bench.RATIO_FIELDS:
        assert out["ratios"]["of_means"][field] == pytest.approx(
            out["summary"]["lora_bench"][field]["mean"] / out["summary"]["peft"][field]["mean"])
        for ratio, ours, peer in zip(out["ratios"]["per_seed"], results["lora_bench"], results["peft"]):
            assert ratio[field] == pytest.approx(ours[field] / peer[field])
    assert out["ratios"]["of_means"]["train_loop_examples_per_s"] == pytest.approx(45 / 90)
    loop = out["summary"]["peft"]["train_loop_examples_per_s"]
    assert loop["mean"] == pytest.approx(90.0) and loop["ci95_low"] < 90.0 < loop["ci95_high"]
    assert out["accuracy"]["equal_within_ci"] is True and out["same_data"] is True

    # Consistently 10 points apart: the paired interval excludes 0.
    results["peft"] = [_row(r["seed"], 8.0, 100.0, r["test_accuracy"] - 0.1 + 0.001 * r["seed"])
                       for r in results["lora_bench"]]
    assert bench.summarize(results)["accuracy"]["equal_within_ci"] is False
    # One seed: no interval, no verdict.
    one = bench.summarize({k: v[:1] for k, v in results.items()})
    assert one["accuracy"]["equal_within_ci"] is None and one["summary"]["peft"]["wall_time_s"]["ci95_low"] is None
    results["peft"][0]["data_cache"] = "other"
    assert bench.summarize(results)["same_data"] is False
    with pytest.raises(ValueError):
        bench.summarize({"lora_bench": results["lora_bench"], "peft": results["peft"][::-1]})


def test_the_whole_benchmark_on_a_tiny_model(sentiment_csv, tmp_path):
    """Both implementations in their own processes, end to end: the JSON's structure, its ratios equal the
    quotients of its own fields, both saw the same data, and the file is readable as a plain open() makes it."""
    out = tmp_path / "bench" / "peer.json"
    overrides = _tiny(sentiment_csv, tmp_path / "cache")
    assert bench.main(["--seeds", "1", "--threads", "1", "--max-train-examples", "48", "--out", str(out),
                       "--set-json", json.dumps(overrides)]) == 0
    data = json.loads(out.read_text())
    assert stat.S_IMODE(out.stat().st_mode) == 0o666 & ~_umask()
    assert set(data) >= {"settings", "machine", "results", "summary", "ratios", "accuracy", "same_data"}
    machine = data["machine"]
    assert machine["cpu_count"] >= 1 and len(machine["load_average_start"]) == len(machine["load_average_end"]) == 3
    assert {"torch", "transformers", "peft"} <= set(machine["versions"])
    assert data["settings"]["data"]["sizes"]["train"] == 48 and data["same_data"] is True
    ours, peer = data["results"]["lora_bench"][0], data["results"]["peft"][0]
    for row in (ours, peer):
        assert row["seed"] == 0 and row["examples_trained"] == 48 and row["optimizer_steps"] == 6
        assert row["wall_time_s"] > row["in_process_wall_time_s"] > row["train_time_s"] > 0
        assert row["whole_run_examples_per_s"] == pytest.approx(48 / row["wall_time_s"])
        assert 0.0 <= row["test_accuracy"] <= 1.0 and row["median_step_s"] <= row["p95_step_s"]
        assert Path(row["record"]).is_file()
    assert ours["trainable_params"] == peer["trainable_params"]
    for field in bench.RATIO_FIELDS:
        assert data["ratios"]["of_means"][field] == pytest.approx(ours[field] / peer[field])
        assert data["ratios"]["per_seed"][0][field] == pytest.approx(ours[field] / peer[field])
    assert data["accuracy"]["equal_within_ci"] is None
    # lora_bench's own run record (its per-step timings feed the benchmark) is no longer private (0600).
    record = Path(ours["record"])
    assert stat.S_IMODE(record.stat().st_mode) == 0o666 & ~_umask()
    assert len(json.loads(record.read_text())["timing"]["step_examples"]) == 6

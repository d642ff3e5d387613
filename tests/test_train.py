"""Training, methods, the CLI and the run record, on a tiny random model and a tiny local file."""

from __future__ import annotations

import json
import math

import pytest
import torch

from lora_bench import SCHEMA_VERSION
from lora_bench.adapters.lora import count_parameters
from lora_bench.cli import main
from lora_bench.config import MethodConfig, RunConfig
from lora_bench.run.methods import METHODS, prepare_model
from lora_bench.run.models import load_model
from lora_bench.run.train import run_training


def _distilbert_count(method: str, **lora) -> int:
    cfg = RunConfig.from_dict({"method": {"name": method, "train_classifier": False, "lora": lora}})
    model = load_model(RunConfig.from_dict({"model": {"source": "random", "name": "distilbert-base"}}).model, 2).model
    prepare_model(model, cfg.method)
    return count_parameters(model)[0]


def test_exact_trainable_counts_on_distilbert_shape():
    # Hand-computed for distilbert-base (6 blocks, dim 768, FFN 3072, vocab 30522, 512 positions):
    # LoRA r=8 on q and v: 6 blocks x 2 matrices x r x (in + out).
    assert _distilbert_count("lora", rank=8, targets=["query", "value"]) == 6 * 2 * 8 * (768 + 768) == 147_456
    # pre_classifier 768x768 + bias, classifier 768x2 + bias.
    assert _distilbert_count("last_layers") == 768 * 768 + 768 + 768 * 2 + 2 == 592_130
    embeddings = 30522 * 768 + 512 * 768 + 2 * 768
    block = 4 * (768 * 768 + 768) + 2 * 768 + (768 * 3072 + 3072) + (3072 * 768 + 768) + 2 * 768
    assert _distilbert_count("full") == embeddings + 6 * block + 592_130 == 66_955_010
    # Coverage: + MLP in the last two blocks only.
    assert _distilbert_count("lora", rank=4, targets=["mlp"], layers=[4, 5]) == 2 * 4 * ((768 + 3072) * 2)


def test_methods_registry_has_the_methods():
    assert {"lora", "qlora", "last_layers", "full"} <= set(METHODS)
    with pytest.raises(ValueError, match="unknown method"):
        prepare_model(None, MethodConfig("prompt_tuning", True, None, None))


def test_same_seed_same_metrics_and_training_learns(tiny_run):
    first = run_training(RunConfig.from_dict(tiny_run))
    second = run_training(RunConfig.from_dict(tiny_run))
    assert first.metrics == second.metrics
    other = run_training(RunConfig.from_dict({**tiny_run, "seed": 1}))
    assert other.metrics != first.metrics
    epochs = first.metrics["epochs"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    assert first.params["trainable"] == 2 * 4 * (32 + 32) * 2 + 32 * 2 + 2  # q,v LoRA + classifier


def test_grad_accum_and_sgd_cosine_run(tiny_run):
    tiny_run["train"].update(grad_accum=2, optimizer="sgd", lr=0.1, schedule="cosine", epochs=1)
    result = run_training(RunConfig.from_dict(tiny_run))
    n_train = result.data_info["sizes"]["train"]
    micro_batches = math.ceil(n_train / 8)
    assert result.timing["optimizer_steps"] == math.ceil(micro_batches / 2)


def test_cli_writes_a_complete_record(tiny_run, tmp_path):
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_run))
    out = tmp_path / "records" / "run.json"
    assert main(["train", "--config", str(config), "--set", "train.epochs=1", "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["schema_version"] == SCHEMA_VERSION
    assert record["status"] == "ok" and record["error"] is None
    assert record["config"]["train"]["epochs"] == 1
    for section in ("metrics", "params", "timing", "memory", "environment", "data", "model"):
        assert record[section], section
    final = record["metrics"]["final"]
    assert {"train_accuracy", "validation_accuracy", "test_accuracy"} <= set(final)
    assert record["timing"]["examples_per_s"] > 0 and record["timing"]["tokens_per_s"] > 0
    assert record["memory"]["peak_rss"] > 0
    assert set(record["environment"]["versions"]) >= {"torch", "transformers"}
    assert "sha" in record["environment"]["git"] and "dirty" in record["environment"]["git"]
    hardware = record["environment"]["hardware"]
    assert hardware["cpu_capability"] == torch.backends.cpu.get_cpu_capability()
    assert not list(out.parent.glob("*.tmp")), "atomic write left a temporary file"


def test_failed_run_is_recorded_not_raised(tiny_run, tmp_path):
    tiny_run["model"]["name"] = "no-such-config"
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_run))
    out = tmp_path / "failed.json"
    assert main(["train", "--config", str(config), "--out", str(out)]) == 0
    record = json.loads(out.read_text())
    assert record["status"] == "failed" and "no-such-config" in record["error"]
    assert main(["train", "--config", str(config), "--out", str(out), "--strict"]) == 1


def test_nan_loss_stops_the_run(tiny_run):
    tiny_run["train"].update(optimizer="sgd", lr=1.0e30, max_grad_norm=None, epochs=3)
    with pytest.raises(RuntimeError, match="loss became"):
        run_training(RunConfig.from_dict(tiny_run))


def test_config_error_exits_2_and_writes_nothing(tmp_path, capsys):
    out = tmp_path / "r.json"
    assert main(["train", "--set", "train.learning_rate=1", "--out", str(out)]) == 2
    assert "learning_rate" in capsys.readouterr().err
    assert not out.exists()

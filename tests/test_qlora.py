"""The qlora method end to end on CPU: 4-bit base everywhere, LoRA trainable, memory accounted exactly."""

from __future__ import annotations

import copy

import torch
from torch import nn

from lora_bench.adapters.lora import LinearWithLoRA, count_parameters
from lora_bench.adapters.quant import LinearNF4, LinearNF4WithLoRA
from lora_bench.config import RunConfig
from lora_bench.run.methods import prepare_model
from lora_bench.run.models import load_model
from lora_bench.run.train import run_training


def _prepared(method: str):
    cfg = RunConfig.from_dict({"model": {"source": "random", "name": "tiny-bert"}, "method": {"name": method}})
    torch.manual_seed(0)
    model = load_model(cfg.model, 2).model
    info = prepare_model(model, cfg.method, "cpu")
    return model, info


def test_qlora_quantizes_every_base_linear_but_the_head():
    model, info = _prepared("qlora")
    assert info["quant_backend"] == "torch"
    kinds = {name: type(m) for name, m in model.named_modules() if isinstance(m, (nn.Linear, LinearNF4))}
    assert kinds["classifier"] is nn.Linear and kinds["bert.pooler.dense"] is nn.Linear
    for name, kind in kinds.items():
        if "encoder.layer" in name:
            expected = LinearNF4WithLoRA if name.endswith(("query", "value")) else LinearNF4
            assert kind is expected, name
    lora_model, _ = _prepared("lora")
    # Same adapters and classifier train in both: identical trainable counts.
    assert count_parameters(model)[0] == count_parameters(lora_model)[0]
    assert sum(isinstance(m, LinearWithLoRA) for m in lora_model.modules()) == 4


def test_qlora_output_starts_equal_to_dequantized_model():
    model, _ = _prepared("qlora")
    ids = torch.randint(5, 100, (2, 12), generator=torch.Generator().manual_seed(0))
    dense = copy.deepcopy(model)
    for name, module in list(dense.named_modules()):
        if isinstance(module, LinearNF4):
            linear = nn.Linear(module.in_features, module.out_features, bias=module.bias is not None)
            with torch.no_grad():
                linear.weight.copy_(module.dequantized_weight(torch.float32))
                if module.bias is not None:
                    linear.bias.copy_(module.bias)
            parent, _, child = name.rpartition(".")
            setattr(dense.get_submodule(parent), child, linear)
    model.eval()
    dense.eval()
    torch.testing.assert_close(model(input_ids=ids).logits, dense(input_ids=ids).logits, atol=1e-5, rtol=1e-4)


def test_qlora_trains_and_stores_less(tiny_run):
    tiny_run["method"]["name"] = "qlora"
    qlora = run_training(RunConfig.from_dict(tiny_run))
    epochs = qlora.metrics["epochs"]
    assert epochs[-1]["train_loss"] < epochs[0]["train_loss"]
    tiny_run["method"]["name"] = "lora"
    lora = run_training(RunConfig.from_dict(tiny_run))
    assert qlora.params["trainable"] == lora.params["trainable"]
    assert qlora.memory["base_weights"] < lora.memory["base_weights"]
    assert qlora.memory["gradients"] == lora.memory["gradients"]
    assert qlora.memory["state"] == qlora.memory["weights"] + qlora.memory["gradients"] + qlora.memory[
        "optimizer_state"]


def test_memory_time_run_through_the_cli(tiny_run, tmp_path):
    import json

    from lora_bench.cli import main

    tiny_run["data"] = {"source": "synthetic", "max_length": 16, "synthetic_examples": 16}
    tiny_run["train"].update(evaluate=False, max_steps=2)
    tiny_run["method"]["name"] = "qlora"
    config = tmp_path / "run.json"
    config.write_text(json.dumps(tiny_run))
    out = tmp_path / "mem.json"
    assert main(["train", "--config", str(config), "--out", str(out), "--strict"]) == 0
    record = json.loads(out.read_text())
    assert record["status"] == "ok" and record["memory"]["base_weights"] > 0
    assert record["method"]["quant_backend"] == "torch"


def test_memory_time_run_on_synthetic_tokens_without_evaluation(tiny_run):
    tiny_run["data"] = {"source": "synthetic", "max_length": 24, "synthetic_examples": 40}
    tiny_run["train"].update(evaluate=False, max_steps=3, epochs=2)
    result = run_training(RunConfig.from_dict(tiny_run))
    assert result.timing["optimizer_steps"] == 3
    assert result.data_info["mean_tokens"]["train"] == 24
    assert "test_accuracy" not in result.metrics["final"]
    assert result.timing["median_step_s"] > 0 and result.timing["tokens_per_s"] > 0

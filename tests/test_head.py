"""What ``train_classifier`` trains: by default the whole head module peft trains for task_type SEQ_CLS (its
``modules_to_save``), checked against peft itself on every architecture of the name map; ``method.head:
last_linear`` keeps the older "output layer only" behaviour."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from lora_bench.adapters.lora import ARCHITECTURES, LinearWithLoRA, count_parameters, find_targets, peft_head_modules
from lora_bench.adapters.quant import LinearNF4
from lora_bench.config import ConfigError, ModelConfig, RunConfig
from lora_bench.run.methods import lora_spec, method_architecture, prepare_model
from lora_bench.run.models import load_model

# A tiny random model of every architecture in the name map (hidden 32, 2 blocks, ALBERT 1 shared block).
TINY = {
    "bert": "tiny-bert",
    "distilbert": "tiny-distilbert",
    "roberta": "tiny-roberta",
    "electra": "tiny-electra",
    "deberta-v2": "tiny-deberta-v2",
    "albert": "tiny-albert",
    "mpnet": "tiny-mpnet",
    "llama": "tiny-llama",
}
RANK = 4
LABELS = 2
OUTPUT = 32 * LABELS + LABELS  # the new 32 -> 2 output layer with bias
DENSE = 32 * 32 + 32  # a new 32 -> 32 layer before it (RoBERTa-style dense, DistilBERT pre_classifier)
# r=4 LoRA on query+value: 2 blocks x 2 layers x r x (32 + 32); ALBERT has one block of weights; Llama's value
# projects to 2 key/value heads of 8 (32 -> 16) and its score layer has no bias.
LORA = {name: 2 * 2 * RANK * (32 + 32) for name in TINY}
LORA["albert"] = 2 * RANK * (32 + 32)
LORA["llama"] = 2 * (RANK * (32 + 32) + RANK * (32 + 16))
# What trains whole by default, by hand from the Hugging Face modules (peft's modules_to_save for SEQ_CLS).
PEFT_HEAD = {
    "bert": (["classifier"], OUTPUT),  # bert.pooler.dense is pretrained and stays frozen
    "distilbert": (["pre_classifier", "classifier"], DENSE + OUTPUT),  # peft's suffix match takes pre_classifier
    "roberta": (["classifier"], DENSE + OUTPUT),  # classifier.dense + classifier.out_proj
    "electra": (["classifier"], DENSE + OUTPUT),
    "deberta-v2": (["classifier"], OUTPUT),  # the ContextPooler (pooler.dense) is outside classifier
    "albert": (["classifier"], OUTPUT),
    "mpnet": (["classifier"], DENSE + OUTPUT),
    "llama": (["score"], 32 * LABELS),
}
LAST_LINEAR = {name: OUTPUT for name in TINY} | {"llama": 32 * LABELS}


def _model(arch: str) -> nn.Module:
    torch.manual_seed(0)
    return load_model(ModelConfig("random", TINY[arch], "float32"), LABELS).model.eval()


def _method(name: str = "lora", **extra):
    return RunConfig.from_dict({"method": {"name": name, "lora": {"rank": RANK, "alpha": 8}, **extra}}).method


def test_every_architecture_of_the_name_map_is_tested():
    assert set(TINY) == set(ARCHITECTURES)


@pytest.mark.parametrize("arch", sorted(TINY))
def test_default_head_trains_what_peft_trains(arch):
    peft = pytest.importorskip("peft")
    ours = _model(arch)
    method = _method()
    targets = find_targets(ours, lora_spec(method), method_architecture(ours, method))
    info = prepare_model(ours, method)
    reference = peft.get_peft_model(_model(arch), peft.LoraConfig(task_type="SEQ_CLS", r=RANK, lora_alpha=8,
                                                                  target_modules=targets))
    # peft keeps a frozen original_module beside the trained modules_to_save copy; count_parameters counts only
    # what requires a gradient.
    peft_count = count_parameters(reference)[0]
    assert count_parameters(ours)[0] == peft_count == LORA[arch] + PEFT_HEAD[arch][1]
    wrapped = [name.removeprefix("base_model.model.") for name, module in reference.named_modules()
               if isinstance(module, peft.utils.ModulesToSaveWrapper)]
    assert info["head"] == "peft" and info["head_modules"] == wrapped == PEFT_HEAD[arch][0]


@pytest.mark.parametrize("arch", sorted(TINY))
def test_default_head_counts_without_peft(arch):
    model = _model(arch)
    info = prepare_model(model, _method())
    assert count_parameters(model)[0] == LORA[arch] + PEFT_HEAD[arch][1]
    assert info["head_modules"] == peft_head_modules(_model(arch)) == PEFT_HEAD[arch][0]
    # Every parameter of the head modules trains, whatever holds it.
    for outer in info["head_modules"]:
        assert all(p.requires_grad for p in model.get_submodule(outer).parameters())


@pytest.mark.parametrize("arch", sorted(TINY))
def test_last_linear_trains_only_the_output_layer(arch):
    model = _model(arch)
    info = prepare_model(model, _method(head="last_linear"))
    assert count_parameters(model)[0] == LORA[arch] + LAST_LINEAR[arch]
    assert info["head"] == "last_linear" and len(info["fully_trained"]) == 1
    two_linears = PEFT_HEAD[arch][1] > LAST_LINEAR[arch]
    assert two_linears == (arch in {"distilbert", "roberta", "electra", "mpnet"})


def test_frozen_head_trains_no_head_whatever_head_says():
    for head in ("peft", "last_linear"):
        model = _model("roberta")
        info = prepare_model(model, _method(train_classifier=False, head=head))
        assert count_parameters(model)[0] == LORA["roberta"] and info["fully_trained"] == []


def test_peft_head_trains_norms_and_biases_inside_the_module():
    class Tiny(nn.Module):
        class config:  # noqa: N801 - mimics a Hugging Face config object
            model_type = "mystery"

        def __init__(self):
            super().__init__()
            self.block = nn.Linear(8, 8)
            self.classifier = nn.Sequential(nn.Linear(8, 8), nn.LayerNorm(8), nn.Linear(8, 3))

    model = Tiny()
    method = RunConfig.from_dict({"method": {"name": "lora", "lora": {"rank": 2, "target_patterns": ["block"]}}}).method
    info = prepare_model(model, method)
    assert info["fully_trained"] == ["classifier.0", "classifier.1", "classifier.2"]
    assert count_parameters(model)[0] == 2 * (8 + 8) + (8 * 8 + 8) + 2 * 8 + (8 * 3 + 3)


def test_no_peft_named_head_is_a_named_error():
    class Unnamed(nn.Module):
        class config:  # noqa: N801 - mimics a Hugging Face config object
            model_type = "mystery"

        def __init__(self):
            super().__init__()
            self.block = nn.Linear(4, 4)
            self.out = nn.Linear(4, 2)

    method = RunConfig.from_dict({"method": {"name": "lora", "lora": {"target_patterns": ["block"]}}}).method
    with pytest.raises(ValueError, match="method.head_patterns"):
        prepare_model(Unnamed(), method)
    # Naming the head makes it the head: all of its layers train.
    named = RunConfig.from_dict({"method": {"name": "lora", "head_patterns": ["out"],
                                            "lora": {"rank": 2, "target_patterns": ["block"]}}}).method
    model = Unnamed()
    assert prepare_model(model, named)["fully_trained"] == ["out"]
    assert count_parameters(model)[0] == 2 * (4 + 4) + 4 * 2 + 2


def test_head_key_defaults_to_peft_is_in_the_resolved_config_and_validated():
    cfg = RunConfig.from_dict({})
    assert cfg.method.head == "peft"
    # The key changes what a run trains, so it is part of the resolved config (runs made before it re-train).
    assert cfg.to_dict()["method"]["head"] == "peft"
    assert RunConfig.from_dict(cfg.to_dict()) == cfg
    with pytest.raises(ConfigError, match=r"method\.head"):
        RunConfig.from_dict({"method": {"head": "all"}})


@pytest.mark.parametrize("targets", [["query", "value"], ["query", "value", "head"]])
def test_qlora_keeps_the_whole_peft_head_full_precision_and_trainable(targets):
    model = _model("roberta")
    extra = {"lora": {"rank": RANK, "alpha": 8, "targets": targets}}
    info = prepare_model(model, _method("qlora", **extra))
    for name in ("classifier.dense", "classifier.out_proj"):
        layer = model.get_submodule(name)
        assert type(layer) in (nn.Linear, LinearWithLoRA), name
        assert all(p.requires_grad for p in layer.parameters())
    assert not any(name.startswith("classifier") for name in info["quantized_frozen"])
    assert any(isinstance(m, LinearNF4) for m in model.modules())
    lora = _model("roberta")
    prepare_model(lora, _method("lora", **extra))
    assert count_parameters(model)[0] == count_parameters(lora)[0]
